"""`kdship deploy triton`: a Triton model repository from an artifact: the classifier (onnxruntime_onnx or
tensorrt_plan), a Python-backend tokenizer before it and a Python-backend label model after it, and an ensemble
chaining the three so clients send raw text and get labels and probabilities back.

config.pbtxt files are built as Triton's own ModelConfig protobuf (from tritonclient) and written in protobuf text
format, so they are valid by construction and parse back with the same schema."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from kdship.artifacts import atomic_write_text, staged_dir
from kdship.manifest import read_manifest
from kdship.manifest import verify as verify_manifest
from kdship.config import TritonConfig
from kdship.errors import ConfigError, ModelError, require_extra

# auto: the plain ONNX graph, which both of Triton's onnxruntime instance kinds run; KIND_AUTO places it on a GPU
# when the server has one and on the CPU otherwise, so one repository loads on either
PREFERRED = {"gpu": ("tensorrt", "fp16", "ort-opt", "onnx"), "cpu": ("ort-opt", "onnx", "int8", "int8-static"),
             "auto": ("onnx", "ort-opt")}
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}
PLATFORMS = {".onnx": "onnxruntime_onnx", ".plan": "tensorrt_plan"}
DTYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float": "TYPE_FP32", "float32": "TYPE_FP32",
          "float16": "TYPE_FP16"}


def model_config_pb2():
    require_extra("triton", "kdship deploy triton", "tritonclient.grpc")
    from tritonclient.grpc import model_config_pb2 as pb

    return pb


def to_pbtxt(config: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> Any:
    """Parse a config.pbtxt strictly against Triton's ModelConfig schema (unknown fields are errors)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


def _pick_variant(manifest: dict[str, Any], cfg: TritonConfig) -> str:
    variants = manifest["variants"]
    if cfg.variant:
        if cfg.variant not in variants:
            raise ModelError(f"the artifact has no {cfg.variant!r} variant (it has {', '.join(variants)})")
        return cfg.variant
    usable = [v for v in PREFERRED[cfg.kind] if v in variants and Path(variants[v]["file"]).suffix in PLATFORMS]
    if not usable:
        raise ModelError(f"the artifact has no variant Triton can serve on {cfg.kind} ({', '.join(PREFERRED[cfg.kind])})")
    return usable[0]


def _tensor(pb: Any, name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": pb.DataType.Value(dtype), "dims": dims}


def _preferred_batches(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b <= max_batch]
    return sizes[-3:] if len(sizes) > 3 else sizes


def classifier_config(name: str, variant: dict[str, Any], file: Path, num_labels: int, cfg: TritonConfig) -> Any:
    pb = model_config_pb2()
    inputs = variant.get("inputs") or {}
    if not inputs:
        raise ModelError(f"the manifest does not describe the inputs of {file.name}; re-export the artifact")
    kind = pb.ModelInstanceGroup.Kind.Value(INSTANCE_KINDS[cfg.kind])
    return pb.ModelConfig(
        name=name, platform=PLATFORMS[file.suffix], max_batch_size=cfg.max_batch,
        input=[_tensor(pb, n, DTYPES[spec["dtype"]], [-1]) for n, spec in inputs.items()],
        output=[_tensor(pb, "logits", "TYPE_FP32", [num_labels]), *_exit_output(pb, variant, num_labels)],
        dynamic_batching=pb.ModelDynamicBatching(preferred_batch_size=_preferred_batches(cfg.max_batch),
                                                 max_queue_delay_microseconds=cfg.queue_delay_us),
        instance_group=[pb.ModelInstanceGroup(count=cfg.instances, kind=kind)])


def _exit_output(pb: Any, variant: dict[str, Any], num_labels: int) -> list[Any]:
    """A model with early exits also answers every exit's logits ([exits, labels] per request), for a client or a
    further ensemble step that decides where each text stops."""
    exits = (variant.get("outputs") or {}).get("exit_logits")
    return [_tensor(pb, "exit_logits", "TYPE_FP32", [int(exits["shape"][1]), num_labels])] if exits else []


def tokenizer_config(name: str, input_names: list[str], max_length: int, cfg: TritonConfig) -> Any:
    pb = model_config_pb2()
    return pb.ModelConfig(
        name=name, backend="python", max_batch_size=cfg.max_batch,
        input=[_tensor(pb, "TEXT", "TYPE_STRING", [1])],
        output=[_tensor(pb, n, "TYPE_INT64", [max_length]) for n in input_names],
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=cfg.queue_delay_us),
        instance_group=[pb.ModelInstanceGroup(count=cfg.instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))],
        parameters={"max_length": pb.ModelParameter(string_value=str(max_length))})


def labels_config(name: str, label_names: list[str], cfg: TritonConfig) -> Any:
    pb = model_config_pb2()
    return pb.ModelConfig(
        name=name, backend="python", max_batch_size=cfg.max_batch,
        input=[_tensor(pb, "logits", "TYPE_FP32", [len(label_names)])],
        output=[_tensor(pb, "LABEL", "TYPE_STRING", [1]),
                _tensor(pb, "PROBABILITIES", "TYPE_FP32", [len(label_names)])],
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=cfg.queue_delay_us),
        instance_group=[pb.ModelInstanceGroup(count=cfg.instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))],
        parameters={"labels": pb.ModelParameter(string_value=json.dumps(label_names))})


def ensemble_config(name: str, models: dict[str, str], input_names: list[str], num_labels: int,
                    cfg: TritonConfig) -> Any:
    """Raw text in; the label, the probabilities and the logits out (what kdship serve answers)."""
    pb = model_config_pb2()
    step = pb.ModelEnsembling.Step
    return pb.ModelConfig(
        name=name, platform="ensemble", max_batch_size=cfg.max_batch,
        input=[_tensor(pb, "TEXT", "TYPE_STRING", [1])],
        output=[_tensor(pb, "LABEL", "TYPE_STRING", [1]), _tensor(pb, "PROBABILITIES", "TYPE_FP32", [num_labels]),
                _tensor(pb, "logits", "TYPE_FP32", [num_labels])],
        ensemble_scheduling=pb.ModelEnsembling(step=[
            step(model_name=models["tokenizer"], model_version=-1, input_map={"TEXT": "TEXT"},
                 output_map={n: n for n in input_names}),
            step(model_name=models["classifier"], model_version=-1, input_map={n: n for n in input_names},
                 output_map={"logits": "logits"}),
            step(model_name=models["labels"], model_version=-1, input_map={"logits": "logits"},
                 output_map={"LABEL": "LABEL", "PROBABILITIES": "PROBABILITIES"}),
        ]))


def _write_config(folder: Path, config: Any) -> None:
    (folder / "1").mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.pbtxt", to_pbtxt(config))


def _tokenizer_files(artifact: Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    if not (artifact / "tokenizer.json").exists():
        raise ModelError(f"{artifact} has no tokenizer.json (a fast tokenizer); re-export it from a model saved with "
                         "a fast tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    shutil.copy2(artifact / "tokenizer.json", dest / "tokenizer.json")
    settings = {"pad_id": tokenizer.pad_token_id, "pad_token": tokenizer.pad_token}
    atomic_write_text(dest / "kdship_tokenizer.json", json.dumps(settings, indent=2) + "\n")
    shutil.copy2(Path(__file__).with_name("triton_tokenizer.py"), dest / "model.py")


def deploy_triton(cfg: TritonConfig) -> dict[str, Any]:
    artifact = Path(cfg.artifact)
    manifest = read_manifest(artifact)
    if manifest is None:
        raise ModelError(f"{artifact} has no manifest.json; deploy an artifact made by `kdship export`")
    if not cfg.output:
        raise ConfigError("no output folder; pass -o model_repository/")
    name = cfg.name or re.sub(r"[^A-Za-z0-9_.-]", "_", artifact.resolve().name)
    variant_name = _pick_variant(manifest, cfg)
    variant = manifest["variants"][variant_name]
    source = artifact / variant["file"]
    if cfg.verify:
        verify_manifest(artifact, manifest, variant["file"])
    input_names = list(variant["inputs"])
    id2label = json.loads((artifact / "config.json").read_text())["id2label"]
    label_names = [str(id2label[str(i)]) for i in range(len(id2label))]
    num_labels = len(label_names)
    max_length = cfg.max_length or manifest.get("max_length") or 128
    models = {"ensemble": name, "tokenizer": f"{name}_tokenizer", "classifier": f"{name}_model",
              "labels": f"{name}_labels"}
    with staged_dir(Path(cfg.output), cfg.overwrite) as repo:
        _write_config(repo / models["classifier"], classifier_config(models["classifier"], variant, source,
                                                                     num_labels, cfg))
        shutil.copy2(source, repo / models["classifier"] / "1" / f"model{source.suffix}")
        _write_config(repo / models["tokenizer"], tokenizer_config(models["tokenizer"], input_names, max_length, cfg))
        _tokenizer_files(artifact, repo / models["tokenizer"] / "1")
        _write_config(repo / models["labels"], labels_config(models["labels"], label_names, cfg))
        shutil.copy2(Path(__file__).with_name("triton_labels.py"), repo / models["labels"] / "1" / "model.py")
        _write_config(repo / name, ensemble_config(name, models, input_names, num_labels, cfg))
    return {"output": cfg.output, "models": models, "variant": variant_name, "max_length": max_length}
