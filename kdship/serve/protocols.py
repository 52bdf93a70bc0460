"""The inference protocols other tools speak, beside kdship's own /v1/classify, on the same model and batcher:

- KServe v2 / Triton HTTP (`/v2/health/*`, `/v2`, `/v2/models/{name}[/ready]`, `POST /v2/models/{name}/infer`):
  a BYTES input `TEXT` of shape [N]; outputs `LABEL` (BYTES [N]), `LABEL_ID` (INT64 [N]) and `PROBABILITIES`
  (FP32 [N, labels]). JSON tensors and the binary tensor extension (what `tritonclient.http` sends by default) both.
- Text Embeddings Inference's classifier route, `POST /predict {"inputs": "..." | ["...", ...]}`.
- `GET /v1/models`, the OpenAI-style model list that gateways probe.
Every route parses and limits its body the same way (depth, size, number of texts, characters, valid Unicode).
Errors come in each protocol's own shape, since their clients parse it: kdship's routes {"error": {"code",
"message"}}, KServe v2 {"error": "message"}, TEI {"error", "error_type"}."""

from __future__ import annotations

import json
import struct
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kdship.config import ServeConfig
from kdship.serve.model import ServedModel

Predict = Callable[[list[str]], Awaitable[list[dict[str, Any]]]]
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension: JSON header, then raw tensors
TEXT_INPUT = "TEXT"


class HttpError(Exception):
    """A request the server refuses: its status code and the message that names the problem."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class ModelFailed(Exception):
    """The model raised on a request that passed every check: a 500, and the server keeps serving."""


def kserve_error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=code)


def model_metadata(model: ServedModel, cfg: ServeConfig) -> dict[str, Any]:
    labels = len(model.label_names)
    return {"name": model.name, "versions": ["1"], "platform": f"kdship_{cfg.backend}",
            "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "LABEL", "datatype": "BYTES", "shape": [-1]},
                        {"name": "LABEL_ID", "datatype": "INT64", "shape": [-1]},
                        {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, labels]}]}


def split_binary_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tensor data after it (none without the extension)."""
    if header_length is None:
        return _json(body), b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise HttpError(400, f"{HEADER_LENGTH} {header_length!r} is not a length within the body")
    return _json(body[:int(header_length)]), body[int(header_length):]


MAX_JSON_DEPTH = 32  # requests are 2-3 levels deep; deeper nesting is refused before it is parsed


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_json(body: bytes) -> Any:
    """A request body as JSON, the same on every route: too deep (the parser would recurse until it fails) or
    malformed (including numbers too long to convert) is a 400."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise HttpError(400, f"JSON nested more than {MAX_JSON_DEPTH} levels deep; requests are 2-3 levels deep")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise HttpError(400, f"malformed JSON: {str(e).splitlines()[0][:200]}") from None


def _json(raw: bytes) -> dict[str, Any]:
    payload = parse_json(raw)
    if not isinstance(payload, dict):
        raise HttpError(400, "the request must be a JSON object with an 'inputs' list")
    return payload


def decode_bytes_tensor(raw: bytes) -> list[str]:
    """Triton's serialisation of a BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    texts, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise HttpError(400, "binary TEXT data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise HttpError(400, "binary TEXT data ends inside an element")
        texts.append(_utf8(raw[offset:offset + size], len(texts)))
        offset += size
    return texts


def _utf8(value: bytes, index: int) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, f"{TEXT_INPUT}[{index}] is not UTF-8 text") from None


def encode_bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def infer_texts(payload: dict[str, Any], binary: bytes, cfg: ServeConfig) -> list[str]:
    """The TEXT input of a v2 infer request, JSON or binary."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HttpError(400, f"'inputs' must be a list holding the BYTES input {TEXT_INPUT!r}")
    found = next((i for i in inputs if isinstance(i, dict) and i.get("name") == TEXT_INPUT), None)
    if found is None:
        names = [i.get("name") for i in inputs if isinstance(i, dict)]
        raise HttpError(400, f"no input named {TEXT_INPUT!r} (got {names}); the model takes one BYTES input "
                                 f"{TEXT_INPUT!r} of shape [N]")
    if found.get("datatype") != "BYTES":
        raise HttpError(400, f"input {TEXT_INPUT!r} must have datatype BYTES, got {found.get('datatype')!r}")
    size = (found.get("parameters") or {}).get("binary_data_size")
    if size is not None:  # inputs before it in the list may be binary too: skip their bytes
        offset = sum((i.get("parameters") or {}).get("binary_data_size", 0) for i in inputs[:inputs.index(found)])
        texts = decode_bytes_tensor(binary[offset:offset + size])
    else:
        data = found.get("data")
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise HttpError(400, f"input {TEXT_INPUT!r} needs 'data': a list of strings")
        texts = data
    shape = found.get("shape")
    if not isinstance(shape, list) or int(np.prod(shape or [0])) != len(texts):
        raise HttpError(400, f"input {TEXT_INPUT!r} has shape {shape} but {len(texts)} elements")
    check_text_limits(texts, cfg, TEXT_INPUT)
    return texts


def check_text_limits(texts: list[str], cfg: ServeConfig, where: str) -> None:
    """The server's request limits, the same on every route: at least one text, at most max_texts, each at most
    max_text_chars characters."""
    if not texts:
        raise HttpError(400, f"{where} is empty; send at least one text")
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer reads
            raise HttpError(400, f"{where}.{i} is not valid Unicode (a lone surrogate); send UTF-8 text") from None
    if len(texts) > cfg.max_texts:
        raise HttpError(413, f"{len(texts)} texts in one request; the limit is {cfg.max_texts}")
    too_long = next((i for i, t in enumerate(texts) if len(t) > cfg.max_text_chars), None)
    if too_long is not None:
        raise HttpError(413, f"{where}.{too_long} has {len(texts[too_long])} characters; the limit is "
                                 f"{cfg.max_text_chars}")


def infer_outputs(predictions: list[dict[str, Any]], labels: list[str]) -> dict[str, tuple[str, list[int], Any]]:
    """Output name -> (datatype, shape, values) for a v2 response."""
    n = len(predictions)
    probabilities = [[p["probabilities"][name] for name in labels] for p in predictions]
    return {"LABEL": ("BYTES", [n], [p["label"] for p in predictions]),
            "LABEL_ID": ("INT64", [n], [p["label_id"] for p in predictions]),
            "PROBABILITIES": ("FP32", [n, len(labels)], probabilities)}


def infer_response(model: ServedModel, payload: dict[str, Any], predictions: list[dict[str, Any]]) -> Response:
    """The v2 response: the outputs asked for (all when none), each as JSON data or, when the request asks for
    binary data (per output, or `binary_data_output` for all), appended raw after the JSON header."""
    outputs = infer_outputs(predictions, model.label_names)
    asked = payload.get("outputs") or [{"name": name} for name in outputs]
    all_binary = bool((payload.get("parameters") or {}).get("binary_data_output"))
    unknown = [o.get("name") for o in asked if o.get("name") not in outputs]
    if unknown:
        raise HttpError(400, f"unknown output {unknown[0]!r}; the outputs are {', '.join(outputs)}")
    header: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": []}
    if payload.get("id") is not None:
        header["id"] = payload["id"]
    blobs = []
    for out in asked:
        datatype, shape, values = outputs[out["name"]]
        entry: dict[str, Any] = {"name": out["name"], "datatype": datatype, "shape": shape}
        if (out.get("parameters") or {}).get("binary_data", all_binary):
            blob = encode_bytes_tensor(values) if datatype == "BYTES" else np.asarray(
                values, dtype=np.float32 if datatype == "FP32" else np.int64).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.asarray(values).ravel().tolist() if datatype != "BYTES" else values
        header["outputs"].append(entry)
    head = json.dumps(header).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


def tei_texts(payload: Any, cfg: ServeConfig) -> tuple[list[str], bool]:
    """TEI's /predict inputs: one text, or a list of texts; whether it was one (the response is then flat)."""
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    if isinstance(inputs, str):
        texts, single = [inputs], True
    elif isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
        texts, single = inputs, False
    else:
        raise HttpError(422, "send {\"inputs\": \"a text\"} or {\"inputs\": [\"a text\", ...]} (text pairs "
                                 "are not served: this model classifies single texts)")
    check_text_limits(texts, cfg, "inputs")
    return texts, single


def add_protocol_routes(app: FastAPI, model: ServedModel, cfg: ServeConfig, predict: Predict,
                        read_body: Callable[[Request], Awaitable[bytes]]) -> None:
    """Register the KServe v2, TEI and model-list routes; `predict` is the server's one way to the model."""

    def known_model(name: str) -> None:
        if name != model.name:
            raise HttpError(404, f"unknown model {name!r}; this server serves {model.name!r}")

    async def guarded(handler: Callable[[], Awaitable[Any]], error: Callable[[int, str], Response]) -> Any:
        try:
            return await handler()
        except HttpError as e:
            return error(e.code, str(e))
        except ModelFailed as e:
            return error(500, f"model failed: {e}")

    @app.get("/v2/health/live")
    @app.get("/v2/health/ready")
    async def v2_health():
        return {}

    @app.get("/v2")
    async def v2_server():
        from importlib.metadata import version

        return {"name": "kdship", "version": version("kdship"), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(name: str, version: str = "1"):
        async def handler():
            known_model(name)
            return model_metadata(model, cfg)
        return await guarded(handler, kserve_error)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str, version: str = "1"):
        async def handler():
            known_model(name)
            return {}
        return await guarded(handler, kserve_error)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: str = "1"):
        async def handler():
            known_model(name)
            payload, binary = split_binary_body(await read_body(request), request.headers.get(HEADER_LENGTH))
            texts = infer_texts(payload, binary, cfg)
            return infer_response(model, payload, await predict(texts))
        return await guarded(handler, kserve_error)

    @app.post("/predict")
    async def tei_predict(request: Request):
        async def handler():
            texts, single = tei_texts(_json(await read_body(request)), cfg)
            ranked = [sorted(({"label": label, "score": score} for label, score in p["probabilities"].items()),
                             key=lambda r: -r["score"]) for p in await predict(texts)]
            return ranked[0] if single else ranked
        return await guarded(handler, lambda code, message: JSONResponse(
            {"error": message, "error_type": "Validation" if code < 500 else "Backend"}, status_code=code))

    @app.get("/v1/models")
    async def model_list():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "kdship"}]}


PROTOCOL_PATHS = {"/v2", "/v2/health/live", "/v2/health/ready", "/predict", "/v1/models"}
