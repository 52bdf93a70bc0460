"""kdship export on a tiny model: every CPU variant, parity enforced, manifest, dynamic shapes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import kdship, kdship_ok
from kdship.artifacts import sha256_file
from kdship.exporters import EXPORTERS, ExportContext, Tolerance, register_exporter

CPU_VARIANTS = {"onnx": "model.onnx", "ort-opt": "model_optimized.onnx", "fp16": "model_fp16.onnx",
                "int8": "model_int8.onnx", "int8-static": "model_int8_static.onnx"}


def test_artifact_holds_every_variant_config_tokenizer_record_and_manifest(artifact):
    expected = set(CPU_VARIANTS.values()) | {"config.json", "tokenizer.json", "tokenizer_config.json", "kdship.json",
                                             "manifest.json"}
    assert {p.name for p in artifact.iterdir()} == expected
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["passed"] and not manifest["allow_mismatch"]
    assert set(manifest["variants"]) == set(CPU_VARIANTS)
    for name, sha in manifest["files"].items():
        assert sha256_file(artifact / name) == sha
    for name, variant in manifest["variants"].items():
        assert variant["file"] == CPU_VARIANTS[name]
        assert variant["inputs"]["input_ids"] == {"dtype": "int64", "shape": ["batch", "sequence"]}
        assert variant["outputs"]["logits"]["shape"] == ["batch", 2]
        parity = variant["parity"]
        assert parity["passed"] and parity["eval_n"] == 120 and "accuracy" in parity
        assert set(parity["shapes"]) == {"real b1 shortest", "real b1 seq48", "real b8 padded", "random b4 seq33"}
    assert manifest["variants"]["onnx"]["parity"]["max_abs"] < 1e-4
    assert manifest["variants"]["int8-static"]["details"]["calibration_samples"] == 128
    # attention fused in the optimised graph: one Attention node per layer of the 2-layer model
    assert manifest["variants"]["ort-opt"]["details"]["fused_operators"]["Attention"] == 2


@pytest.mark.parametrize("variant", sorted(CPU_VARIANTS))
@pytest.mark.parametrize("shape", [(1, 3), (5, 48), (2, 17)])
def test_every_variant_runs_at_any_batch_and_sequence_length(artifact, teacher_dir, variant, shape):
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    ids = rng.integers(5, model.config.vocab_size, size=shape)
    mask = np.ones_like(ids)
    mask[0, shape[1] // 2 + 1:] = 0  # padding in the first row
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    session = ort.InferenceSession(str(artifact / CPU_VARIANTS[variant]), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    bound = {"onnx": 1e-4, "ort-opt": 1e-4, "fp16": 5e-2}.get(variant, 0.5)
    assert got.shape == want.shape and np.abs(got - want).max() < bound


def test_fp16_keeps_layernorm_in_fp32(artifact):
    graph = onnx.load(str(artifact / "model_fp16.onnx")).graph
    norms = [n for n in graph.node if "LayerNormalization" in n.op_type]
    assert norms
    fp16_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert fp16_inits, "weights are fp16"
    assert not any(inp in fp16_inits for n in norms for inp in n.input[1:3]), "LayerNorm scale/bias stay fp32"


def test_export_output_is_usable_by_transformers(artifact):
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    enc = tokenizer(["the movie was great"], return_tensors="np")
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
    assert logits.shape == (1, 2)


@pytest.fixture
def broken_exporter():
    """A backend that writes a wrong model, to prove parity failures fail the command."""

    @register_exporter("broken", "model_broken.onnx", "fp32", Tolerance(max_abs=1e-4, min_agreement=1.0), needs="onnx")
    def export_broken(ctx: ExportContext) -> Path:
        """ONNX with its classifier bias shifted (test only)."""
        model = onnx.load(str(ctx.files["onnx"]))
        bias = next(i for i in model.graph.initializer if "classifier.bias" in i.name)
        values = onnx.numpy_helper.to_array(bias) + np.array([5.0, -5.0], dtype=np.float32)
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        path = ctx.out_dir / "model_broken.onnx"
        onnx.save(model, str(path))
        return path

    yield
    EXPORTERS.pop("broken")


def test_parity_miss_fails_the_export_and_leaves_nothing(teacher_dir, tmp_path, broken_exporter):
    out = tmp_path / "art"
    result = kdship("export", teacher_dir, "--to", "broken", "-o", out)
    assert result.exit_code == 1
    assert "parity failed for broken" in result.stderr and "✗" in result.stdout
    assert not out.exists() and not list(tmp_path.glob(".art*"))


def test_allow_mismatch_writes_the_artifact_and_records_it(teacher_dir, tmp_path, broken_exporter):
    out = tmp_path / "art"
    kdship_ok("export", teacher_dir, "--to", "broken", "--allow-mismatch", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["allow_mismatch"] and not manifest["passed"]
    assert manifest["variants"]["onnx"]["parity"]["passed"] and not manifest["variants"]["broken"]["parity"]["passed"]


def _user_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_failing_exporter_is_one_line_and_leaves_nothing(teacher_dir, tmp_path):
    @register_exporter("crashing", "model_crashing.onnx", "fp32", Tolerance(max_abs=1e-4, min_agreement=1.0))
    def export_crashing(ctx: ExportContext) -> Path:
        """Raises what a library raises on a model it cannot handle (test only)."""
        (ctx.out_dir / "model_crashing.onnx").write_bytes(b"half")
        raise RuntimeError("unsupported operator aten::frobnicate\nlong library trace")

    try:
        result = kdship("export", teacher_dir, "--to", "crashing", "-o", tmp_path / "art")
    finally:
        EXPORTERS.pop("crashing")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "export to crashing failed (RuntimeError: unsupported operator aten::frobnicate)" in result.stderr
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art*"))


def test_ort_opt_alone_is_built_from_its_own_export(teacher_dir, tmp_path):
    kdship_ok("export", teacher_dir, "--to", "ort-opt", "--opset", "23", "-o", tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"ort-opt"} and not (tmp_path / "art" / "model.onnx").exists()
    assert manifest["variants"]["ort-opt"]["details"]["opset"] == 20  # the TorchScript exporter's newest
    assert manifest["variants"]["ort-opt"]["parity"]["passed"]


def test_export_bad_inputs(teacher_dir, artifact, tmp_path):
    _user_error(kdship("export", tmp_path / "nope", "-o", tmp_path / "a"), "not found")
    _user_error(kdship("export", teacher_dir, "--to", "onnx", "-o", artifact), "--overwrite")
    _user_error(kdship("export", teacher_dir, "--to", "tflite", "-o", tmp_path / "a"), "valid targets: onnx")
    _user_error(kdship("export", teacher_dir, "--opset", "13", "-o", tmp_path / "a"), "opset: Input should be greater than or equal to 18")
    _user_error(kdship("export", teacher_dir, "--opset", "24", "-o", tmp_path / "a"), "opset: Input should be less than or equal to 23")
    _user_error(kdship("export", teacher_dir, "--to", "int8-static", "--calib-data", tmp_path / "missing.tsv",
                       "-o", tmp_path / "a"), "not found")
    assert not (tmp_path / "a").exists()


def test_aoti_package_matches_pytorch_at_several_shapes(teacher_dir, tmp_path):
    out = tmp_path / "aoti"
    kdship_ok("export", teacher_dir, "--to", "aoti", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    variant = manifest["variants"]["aoti"]
    assert variant["file"] == "model.pt2" and variant["parity"]["passed"]
    assert variant["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    assert variant["details"]["device"] in ("cpu", "cuda")
    assert variant["parity"]["max_abs"] < 1e-4


def _tensorrt_missing() -> str | None:
    from kdship.exporters.tensorrt import _unavailable

    return _unavailable()


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=f"TensorRT engine build: {_tensorrt_missing()}")
def test_tensorrt_engine_builds_keeps_dynamic_shapes_and_records_the_gpu(teacher_dir, tmp_path):
    out = tmp_path / "trt"
    kdship_ok("export", teacher_dir, "--to", "tensorrt", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    details = manifest["variants"]["tensorrt"]["details"]
    assert {"gpu", "compute_capability", "tensorrt_version"} <= set(details)
    assert manifest["variants"]["tensorrt"]["parity"]["passed"]


def test_tensorrt_absent_or_gpu_less_is_a_one_line_error(teacher_dir, tmp_path):
    if _tensorrt_missing() is None:
        pytest.skip("TensorRT and a GPU are present here; the engine test above covers this machine")
    _user_error(kdship("export", teacher_dir, "--to", "tensorrt", "-o", tmp_path / "t"), "not available here")
