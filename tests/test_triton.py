"""kdship deploy triton: the repository's configs parse strictly against Triton's ModelConfig schema, and the
tokenizer model's own functions produce ids that give the PyTorch model's predictions."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import kdship_ok
from kdship.serve import triton_tokenizer
from kdship.serve.triton import parse_pbtxt


@pytest.fixture(scope="module")
def repo(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    kdship_ok("deploy", "triton", artifact, "-o", out, "--name", "sst2", "--kind", "cpu", "--max-batch", "32",
              "--instances", "2")
    return out


def test_repository_layout(repo):
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == ["sst2/config.pbtxt", "sst2_labels/1/model.py", "sst2_labels/config.pbtxt",
                     "sst2_model/1/model.onnx", "sst2_model/config.pbtxt",
                     "sst2_tokenizer/1/kdship_tokenizer.json", "sst2_tokenizer/1/model.py",
                     "sst2_tokenizer/1/tokenizer.json", "sst2_tokenizer/config.pbtxt"]
    assert all(p.stat().st_mode & 0o055 == 0o055 for p in repo.rglob("*") if p.is_dir())  # non-root containers
    assert (repo / "sst2" / "1").is_dir(), "Triton needs a version folder for the ensemble too"


def test_configs_parse_against_tritons_schema(repo):
    classifier = parse_pbtxt((repo / "sst2_model" / "config.pbtxt").read_text())
    assert classifier.platform == "onnxruntime_onnx" and classifier.max_batch_size == 32
    assert [i.name for i in classifier.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(list(i.dims) == [-1] for i in classifier.input)
    assert list(classifier.output[0].dims) == [2]
    assert list(classifier.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert classifier.instance_group[0].count == 2 and classifier.instance_group[0].kind == 2  # KIND_CPU

    tokenizer = parse_pbtxt((repo / "sst2_tokenizer" / "config.pbtxt").read_text())
    assert tokenizer.backend == "python" and tokenizer.parameters["max_length"].string_value == "48"

    ensemble = parse_pbtxt((repo / "sst2" / "config.pbtxt").read_text())
    first, second, third = ensemble.ensemble_scheduling.step
    assert (first.model_name, second.model_name, third.model_name) == ("sst2_tokenizer", "sst2_model", "sst2_labels")
    assert dict(first.output_map) == dict(second.input_map) == {n: n for n in ("input_ids", "attention_mask",
                                                                               "token_type_ids")}
    assert [o.name for o in ensemble.output] == ["LABEL", "PROBABILITIES", "logits"]
    labels = parse_pbtxt((repo / "sst2_labels" / "config.pbtxt").read_text())
    assert json.loads(labels.parameters["labels"].string_value) == ["negative", "positive"]


def test_strict_parser_rejects_unknown_fields(repo):
    text = (repo / "sst2_model" / "config.pbtxt").read_text() + "\nmax_batch: 3\n"
    with pytest.raises(text_format.ParseError):
        parse_pbtxt(text)


def test_tokenizer_model_functions_give_the_pytorch_predictions(repo, teacher_dir):
    folder = repo / "sst2_tokenizer" / "1"
    tokenizer = triton_tokenizer.load_tokenizer(folder, 48)
    texts = ["the movie was great", "the plot was not good at all", "honestly , the cast was dull"]
    as_triton_sends = np.array([[t.encode()] for t in texts], dtype=object)
    arrays = triton_tokenizer.encode(tokenizer, triton_tokenizer.decode_text_input(as_triton_sends),
                                     ["input_ids", "attention_mask", "token_type_ids"])
    assert all(a.shape == (3, 48) and a.dtype == np.int64 for a in arrays.values())
    hf = AutoTokenizer.from_pretrained(teacher_dir)(texts, padding="max_length", max_length=48, return_tensors="np")
    assert np.array_equal(arrays["input_ids"], hf["input_ids"])
    logits = ort.InferenceSession(str(repo / "sst2_model" / "1" / "model.onnx")).run(["logits"], arrays)[0]
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits.numpy()
    assert np.array_equal(logits.argmax(-1), expected.argmax(-1))
    assert json.loads((folder / "kdship_tokenizer.json").read_text())["pad_token"] == "[PAD]"


def test_gpu_kind_prefers_fp16_and_gpu_instances(artifact, tmp_path):
    out = tmp_path / "repo"
    kdship_ok("deploy", "triton", artifact, "-o", out, "--kind", "gpu")
    classifier = parse_pbtxt((out / "artifact_model" / "config.pbtxt").read_text())
    assert classifier.instance_group[0].kind == 1  # KIND_GPU
    assert (out / "artifact_model" / "1" / "model.onnx").stat().st_size == (artifact / "model_fp16.onnx").stat().st_size


def test_auto_kind_loads_on_either_kind_of_server(artifact, tmp_path):
    out = tmp_path / "repo"
    kdship_ok("deploy", "triton", artifact, "-o", out)
    classifier = parse_pbtxt((out / "artifact_model" / "config.pbtxt").read_text())
    assert classifier.instance_group[0].kind == 0  # KIND_AUTO: a GPU when the server has one, else the CPU
    assert (out / "artifact_model" / "1" / "model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()


class _StandInTritonUtils:
    """The calls the Python-backend models make on triton_python_backend_utils, as Triton's module behaves."""

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)


def _python_model(repo, name, monkeypatch):
    """The repository's model.py loaded as Triton loads it, initialised with the config Triton would pass."""
    import importlib.util
    import sys

    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _StandInTritonUtils)
    spec = importlib.util.spec_from_file_location(f"triton_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(parse_pbtxt((repo / name / "config.pbtxt").read_text()),
                                       preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name),
                      "model_version": "1"})
    return model


def test_python_backend_models_chained_as_the_ensemble_answer_what_kdship_serve_answers(repo, artifact,
                                                                                        monkeypatch):
    from kdship.serve.model import load_served_model

    tokenizer, labels = _python_model(repo, "sst2_tokenizer", monkeypatch), _python_model(repo, "sst2_labels",
                                                                                           monkeypatch)
    classifier = ort.InferenceSession(str(repo / "sst2_model" / "1" / "model.onnx"))
    texts = [["the movie was great", "dull , dull , dull"], ["an honest , moving film"]]
    requests = [{"TEXT": _StandInTritonUtils.Tensor("TEXT", np.array([[t.encode()] for t in batch], dtype=object))}
                for batch in texts] + [{"TEXT": _StandInTritonUtils.Tensor("TEXT", np.array([[b"\xff\xfe"]],
                                                                                            dtype=object))}]
    encoded = tokenizer.execute(requests)
    assert encoded[2].error is not None and "not UTF-8" in encoded[2].error.message()  # its own error only
    answers = []
    for response in encoded[:2]:
        assert response.error is None
        logits = classifier.run(["logits"], response.outputs)[0]
        [labelled] = labels.execute([{"logits": _StandInTritonUtils.Tensor("logits", logits)}])
        answers += list(zip(labelled.outputs["LABEL"].reshape(-1), labelled.outputs["PROBABILITIES"]))
    served = load_served_model(artifact, "ort-cpu", "onnx").predict([t for batch in texts for t in batch])
    assert [label.decode() for label, _ in answers] == [p["label"] for p in served]
    assert np.allclose([probs[1] for _, probs in answers], [p["probabilities"]["positive"] for p in served],
                       atol=1e-5)
