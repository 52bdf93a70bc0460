"""kdship serve: a real HTTP server on 127.0.0.1 with a tiny exported model, real requests, bad inputs, batching,
metrics, graceful shutdown; predictions equal kdship eval's (PyTorch) on the same texts."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import kdship
from kdship.data import load_table, tokenize
from kdship.evaluate import predict_logits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, *flags: str) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kdship.cli", "serve", str(artifact), "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
    return url, proc


@pytest.fixture(scope="module")
def server(artifact: Path):
    url, proc = start_server(artifact, "--max-batch", "16", "--max-wait-ms", "30", "--max-texts", "8",
                             "--max-text-chars", "200")
    yield url, proc
    proc.kill()


def _classify(url: str, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json={"texts": texts}, timeout=30)


def test_predictions_equal_pytorch_eval_on_the_same_texts(server, teacher_dir, data_dir):
    url, _ = server
    table = load_table(str(data_dir / "dev.tsv"), None, None, max_samples=40)
    texts = [t[0] for t in table.texts]
    served = [p for i in range(0, 40, 8) for p in _classify(url, texts[i:i + 8]).json()["predictions"]]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    logits = predict_logits(model, tokenizer, tokenize(tokenizer, table, 48, None), 64, torch.device("cpu"))
    names = [model.config.id2label[i] for i in range(2)]
    assert [p["label"] for p in served] == [names[i] for i in logits.argmax(-1).tolist()]
    probs = logits.softmax(-1)
    assert max(abs(p["probabilities"][names[1]] - probs[i, 1].item()) for i, p in enumerate(served)) < 1e-4


@pytest.mark.parametrize("body, headers, status, message", [
    (b'{"texts": [', {"content-type": "application/json"}, 400, "malformed JSON"),
    (b'{"sentences": ["a"]}', {"content-type": "application/json"}, 422, "texts: Field required"),
    (b'{"texts": []}', {"content-type": "application/json"}, 422, "at least 1 item"),
    (b'{"texts": [1]}', {"content-type": "application/json"}, 422, "texts.0"),
    (json.dumps({"texts": ["a"] * 9}).encode(), {"content-type": "application/json"}, 413, "limit is 8"),
    (json.dumps({"texts": ["a" * 201]}).encode(), {"content-type": "application/json"}, 413, "texts.0 has 201"),
    (b"texts=a", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    (b'{"texts": ["a"]}', {}, 415, "application/json"),
    (b"x" * (2 << 20), {"content-type": "application/json"}, 413, "limit is 1048576"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_lives_on(server, body, headers, status, message):
    url, _ = server
    response = httpx.post(f"{url}/v1/classify", content=body, headers=headers, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and message in error["message"]
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"


def test_concurrent_requests_are_batched_and_counted(server):
    url, _ = server
    before = _metric(url, "kdship_batch_size_count")
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: _classify(url, [f"the plot was good {i}", "the cast was dull"]),
                                  range(24)))
    assert all(r.status_code == 200 and len(r.json()["predictions"]) == 2 for r in responses)
    calls = _metric(url, "kdship_batch_size_count") - before
    assert 1 <= calls < 24, "dynamic batching should merge concurrent requests into fewer model calls"
    assert _metric(url, 'kdship_requests_total{endpoint="/v1/classify",status="200"}') >= 24


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_model_endpoint_describes_the_artifact(server):
    url, _ = server
    info = httpx.get(f"{url}/v1/model", timeout=5).json()
    assert info["file"] == "model_optimized.onnx" and info["backend"] == "ort-cpu"
    assert info["labels"] == ["negative", "positive"]
    assert "onnx" in info["manifest"]["variants"]
    assert info["limits"]["max_texts"] == 8


def test_graceful_shutdown_finishes_in_flight_requests(artifact):
    url, proc = start_server(artifact, "--max-batch", "64", "--max-wait-ms", "1000")
    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(_classify, url, ["the ending was moving"]) for _ in range(4)]
        time.sleep(0.5)  # all four are waiting in the batcher (it waits up to 1 s for more) when the signal comes
        proc.send_signal(signal.SIGTERM)
        assert all(f.result().status_code == 200 for f in in_flight)
    # uvicorn drains, then re-raises SIGTERM so the exit status is the conventional one for it
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_serve_and_deploy_bad_inputs_are_one_line_errors(teacher_dir, tmp_path):
    for args, message in [
        (["serve", tmp_path / "missing"], "not found"),
        (["serve", teacher_dir], "has no manifest.json"),
        (["serve", teacher_dir, "--backend", "onnxx"], "valid backends: ort-cpu"),
        (["deploy", "triton", teacher_dir, "-o", tmp_path / "repo"], "has no manifest.json"),
    ]:
        result = kdship(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "repo").exists()


def test_torch_backend_serves_the_model_folder_in_process(teacher_dir):
    from fastapi.testclient import TestClient

    from kdship.config import ServeConfig
    from kdship.serve.app import create_app
    from kdship.serve.model import load_served_model

    cfg = ServeConfig(artifact=str(teacher_dir), backend="torch", batching=False)
    app = create_app(load_served_model(teacher_dir, "torch"), cfg)
    with TestClient(app) as client:
        response = client.post("/v1/classify", json={"texts": ["the acting was superb"]})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] in ("negative", "positive")


def test_deep_json_unknown_routes_and_methods_get_kdship_errors_and_are_counted(server):
    url, proc = server
    deep = b'{"texts": ' + b"[" * 3000 + b"]" * 3000 + b"}"  # 6 KB: would overflow the JSON parser's recursion
    name = httpx.get(f"{url}/v1/model", timeout=5).json()["name"]
    json_body = {"content-type": "application/json"}
    with httpx.Client(timeout=10) as client:  # one keep-alive connection: the next request must not be reset
        r = client.post(f"{url}/v1/classify", content=deep, headers=json_body)
        assert r.status_code == 400 and "nested more than 32 levels" in r.json()["error"]["message"]
        assert client.post(f"{url}/v1/classify", json={"texts": ["fine"]}).status_code == 200
        # every route parses its body the same way: too deep, a number too long to convert, a lone surrogate
        bad_bodies = (deep, b'{"inputs": [' + b"7" * 5000 + b"]}", b'{"texts": ["\\ud800"], "inputs": "\\ud800"}')
        for path in ("/v1/classify", "/predict", f"/v2/models/{name}/infer"):
            for body in bad_bodies:
                r = client.post(f"{url}{path}", content=body, headers=json_body)
                assert r.status_code in (400, 422), (path, body[:40], r.status_code, r.text[:200])
        lone = client.post(f"{url}/v1/classify", content=b'{"texts": ["\\ud800"]}', headers=json_body)
        assert "lone surrogate" in lone.json()["error"]["message"], lone.text
        assert client.post(f"{url}/v1/classify", json={"texts": ["fine"]}).status_code == 200
        for method, path, code in (("GET", "/nope", 404), ("GET", "/v1/classify", 405), ("DELETE", "/health", 405)):
            r = client.request(method, f"{url}{path}")
            assert r.status_code == code and r.json()["error"]["code"] == code, r.text
    assert _metric(url, 'kdship_requests_total{endpoint="/v1/classify",status="400"}') >= 4
    assert _metric(url, 'kdship_requests_total{endpoint="/predict",status="400"}') >= 3
    assert _metric(url, 'kdship_requests_total{endpoint="other",status="404"}') >= 1
    assert _metric(url, 'kdship_requests_total{endpoint="/v1/classify",status="405"}') >= 1
    assert proc.poll() is None


def test_json_depth_ignores_brackets_inside_strings():
    from kdship.serve.protocols import json_depth

    assert json_depth(b'{"texts": ["[[[[", "a \\" [[ b"]}') == 2
    assert json_depth(b"[[[]]]") == 3


def test_kserve_v2_routes_answer_tritonclient_in_json_and_binary(server):
    """A real Triton client (tritonclient.http) against kdship serve: health, metadata, infer with a BYTES TEXT
    input, JSON tensors and the binary tensor extension, outputs equal to /v1/classify's."""
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    url, proc = server
    texts = ["a wonderful , moving film", "dull and far too long", "fine"]
    expected = _classify(url, texts).json()["predictions"]
    name = httpx.get(f"{url}/v1/model", timeout=5).json()["name"]
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}]
    for binary in (False, True):
        text = triton.InferInput("TEXT", [len(texts)], "BYTES")
        text.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("LABEL", "PROBABILITIES")]
        result = client.infer(name, [text], outputs=outputs)
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("LABEL")]  # binary: bytes
        assert labels == [p["label"] for p in expected]
        probabilities = result.as_numpy("PROBABILITIES")
        assert probabilities.shape == (3, 2) and probabilities.dtype == np.float32
        assert np.allclose(probabilities[:, 1], [p["probabilities"]["positive"] for p in expected], atol=1e-6)
    everything = client.infer(name, [text])  # no outputs named: all of them (binary, as the client asks)
    assert everything.as_numpy("LABEL_ID").tolist() == [p["label_id"] for p in expected]
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.infer("other", [text])
    header = json.dumps({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 6}}]}).encode()
    bad = httpx.post(f"{url}/v2/models/{name}/infer", content=header + b"\x02\x00\x00\x00\xff\xfe",
                     headers={"Inference-Header-Content-Length": str(len(header))}, timeout=10)
    assert bad.status_code == 400 and "not UTF-8" in bad.json()["error"], bad.text
    assert proc.poll() is None


def test_tei_predict_model_list_openapi_and_no_build_paths(server):
    url, _ = server
    single = httpx.post(f"{url}/predict", json={"inputs": "a wonderful film"}, timeout=10).json()
    assert [r["label"] for r in single] and single[0]["score"] >= single[1]["score"]
    assert {r["label"] for r in single} == {"negative", "positive"}
    batch = httpx.post(f"{url}/predict", json={"inputs": ["a", "b"]}, timeout=10).json()
    assert len(batch) == 2 and all(len(rows) == 2 for rows in batch)
    bad = httpx.post(f"{url}/predict", json={"inputs": [["a", "b"]]}, timeout=10)
    assert bad.status_code == 422 and "pairs are not served" in bad.json()["error"]
    name = httpx.get(f"{url}/v1/model", timeout=5).json()["name"]
    assert httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"] == name
    schema = httpx.get(f"{url}/openapi.json", timeout=5).json()["paths"]["/v1/classify"]["post"]["requestBody"]
    assert "texts" in schema["content"]["application/json"]["schema"]["properties"]
    manifest = httpx.get(f"{url}/v1/model", timeout=5).json()["manifest"]
    assert "/" not in manifest["source"]["student"] and "/" not in manifest["config"]["output"]
