"""`kdship export`: the student as ONNX (+ optimised / fp16 / int8 variants), each checked against PyTorch, in one
self-describing artifact folder: model files, config.json, tokenizer, kdship.json, manifest.json (hashes, I/O,
parity, accuracy per variant, versions). A failed check leaves no artifact unless --allow-mismatch."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdship.models import under_weights_policy
from kdship.artifacts import (RECORD_NAME, atomic_write_json, check_output_dir, library_versions, read_record,
                              recorded_source, sha256_file, staged_dir)
from kdship.config import ExportConfig, to_record
from kdship.data import encode_labels, load_table
from kdship.errors import CheckFailed, ConfigError, DataError, KdshipError, ModelError
from kdship.manifest import MANIFEST
from kdship.tokenizer import max_positions_of, save_tokenizer



def _student(cfg: ExportConfig) -> tuple[Any, Any, dict[str, Any]]:
    from kdship.models import build_model, label_names_of, load_config, load_tokenizer

    from kdship.biencoder import biencoder_settings

    config = load_config(cfg.student, "student")
    if biencoder_settings(config):
        raise ModelError(f"{cfg.student} is a dual-tower (match) model; export takes classifiers only for now: "
                         "export a model made with --objective classify")
    if label_names_of(config) is None:
        raise ModelError(f"{cfg.student} is not a classifier (no trained classification head); export a model "
                         "made by `kdship train` or `kdship distill`")
    record = read_record(Path(cfg.student)) or {}
    return build_model("classify", cfg.student, keep_exits=True).eval(), load_tokenizer(cfg.student, "student"), record


def _data_source(explicit: str | None, record: dict[str, Any], folder: str, *keys: str) -> str | None:
    """The data the command line names, else the data the student's record (in `folder`) says it was trained on."""
    for key in keys:
        source = recorded_source(record, key, Path(folder))
        if explicit or source:
            return explicit or source
    return None


def _eval_set(cfg: ExportConfig, record: dict[str, Any], model: Any,
              tokenizer: Any) -> tuple[list, np.ndarray | None, str]:
    """Texts for parity, with labels when the data has them (then accuracy per variant is measured too), and
    where they came from. A model without data (a hub model, a folder made elsewhere) is checked on built-in
    sentences and random word salads: parity and agreement are measured, accuracy is not."""
    from kdship.exporters.parity import builtin_texts
    from kdship.models import label_names_of

    source = _data_source(cfg.eval_data, record, cfg.student, "eval", "train")
    columns = _text_columns(cfg, record)
    if source is None:
        texts = builtin_texts(tokenizer, len(columns or [None]), cfg.eval_samples or 256)
        print(f"note: no eval data (none given, none in the model's kdship.json): parity checked on {len(texts)} "
              "built-in and random texts; accuracy was not measured (pass --eval-data FILE to measure it)")
        return texts, None, "built-in texts (no eval data: accuracy not measured)"
    try:
        table = load_table(source, columns, cfg.label_column, cfg.eval_samples)
    except DataError:  # unlabeled text: parity and agreement only; a missing file raises again just below
        return load_table(source, columns, None, cfg.eval_samples).texts, None, source
    return table.texts, np.array(encode_labels(table.raw_labels, label_names_of(model.config), table.source)), source


def _text_columns(cfg: ExportConfig, record: dict[str, Any]) -> list[str] | None:
    """The columns the student was trained on, unless the command line names others."""
    return cfg.text_columns or record.get("config", {}).get("data", {}).get("text_columns")


def _build(exporter: Any, ctx: Any) -> Path:
    """One variant's file. A library failing on an unusual model is reported in one line (the staged folder is
    dropped, so nothing half-written remains)."""
    try:
        return exporter.build(ctx)
    except KdshipError:
        raise
    except Exception as e:  # torch.onnx, onnxruntime and tensorrt raise many types; all mean "this variant failed"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckFailed(f"export to {exporter.name} failed ({type(e).__name__}: {first}); export the other "
                          "variants, and report this with the model type") from None


def _onnx_io(path: Path) -> dict[str, Any]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {kind: {v.name: {"dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                   for v in values} for kind, values in (("inputs", graph.input), ("outputs", graph.output))}


def _manifest(cfg: ExportConfig, out: Path, order: list, ctx: Any, parity: dict[str, Any],
              record: dict[str, Any], max_length: int, checked_on: dict[str, Any]) -> dict[str, Any]:
    variants = {}
    for exporter in order:
        path = ctx.files[exporter.name]
        io = _onnx_io(path) if path.suffix == ".onnx" else ctx.details[exporter.name].pop("io", {})
        variants[exporter.name] = {"file": path.name, "precision": exporter.precision, **io,
                                   "details": ctx.details.get(exporter.name, {}), "parity": parity[exporter.name]}
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format": "kdship-artifact/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"student": str(Path(cfg.student).resolve()), "record": RECORD_NAME if record else None,
                       "metrics": record.get("metrics")},
            "config": to_record(cfg), "opset": cfg.opset, "max_length": max_length, "checked_on": checked_on,
            "variants": variants, "files": files,
            "passed": all(p["passed"] for p in parity.values()), "allow_mismatch": cfg.allow_mismatch,
            "versions": library_versions()}


@under_weights_policy
def export(cfg: ExportConfig) -> dict[str, Any]:
    from kdship.exporters import ExportContext, build_order
    from kdship.exporters.onnx_export import input_names_for
    from kdship.early_exit import EarlyExitModel
    from kdship.exporters.parity import (batched, check_exits, check_variant, parity_cases, print_parity,
                                         torch_reference)

    if not cfg.output:
        raise ConfigError("no output folder; pass -o DIR")
    check_output_dir(Path(cfg.output), cfg.overwrite)  # before anything is loaded: the first problem is said first
    order = build_order(cfg.to)
    model, tokenizer, record = _student(cfg)
    from kdship.models import max_tokens

    trained = record.get("data", {}).get("max_length") or record.get("config", {}).get("data", {}).get("max_length")
    max_length = max_tokens(cfg.max_length or trained or 128, model.config)
    names = input_names_for(tokenizer, model.config)
    texts, labels, parity_inputs = _eval_set(cfg, record, model, tokenizer)
    cases = parity_cases(tokenizer, texts, names, max_length, model.config.vocab_size)
    eval_batches = batched(tokenizer, texts, names, max_length)
    exits = isinstance(model, EarlyExitModel)  # a model with early exits: their logits are checked too
    on_cases = {name: torch_reference(model, feeds) for name, feeds in cases.items()}
    reference, reference_exits = ({name: out[i] for name, out in on_cases.items()} for i in (0, 1))
    on_eval = [torch_reference(model, feeds) for feeds in eval_batches]
    reference_eval = np.concatenate([logits for logits, _ in on_eval])
    reference_eval_exits = np.concatenate([exit_logits for _, exit_logits in on_eval]) if exits else None
    parity: dict[str, Any] = {}
    with staged_dir(Path(cfg.output), cfg.overwrite) as out:
        ctx = ExportContext(model, tokenizer, out, cfg)
        if any(e.name == "int8-static" for e in order):
            calib_source = _data_source(cfg.calib_data, record, cfg.student, "train", "eval")
            if calib_source is None:
                raise ConfigError("int8-static calibrates activation ranges on real inputs and the model names no "
                                  "data; pass --calib-data FILE (or export int8, which needs none)")
            calib = load_table(calib_source, _text_columns(cfg, record), None, cfg.calib_samples).texts
            ctx.calibration = batched(tokenizer, calib, names, max_length, size=16)
        for exporter in order:
            ctx.files[exporter.name] = _build(exporter, ctx)
            parity[exporter.name] = check_variant(exporter, ctx.files[exporter.name], cases, reference,
                                                  eval_batches, reference_eval, labels, cfg.max_accuracy_drop)
            exit_check = (check_exits(exporter, ctx.files[exporter.name], cases, reference_exits, eval_batches,
                                      reference_eval_exits) if exits else None)
            if exit_check is not None:
                parity[exporter.name] |= {"exits": exit_check, "passed": parity[exporter.name]["passed"]
                                          and exit_check["passed"]}
                parity[exporter.name]["checks"]["exits"] = exit_check["passed"]
        print_parity(parity)
        failed = [name for name, p in parity.items() if not p["passed"]]
        if failed and not cfg.allow_mismatch:
            raise CheckFailed(f"parity failed for {', '.join(failed)} (see the table); no artifact written. Fix the "
                              "model or pass --allow-mismatch to write it anyway (recorded in the manifest)")
        model.config.save_pretrained(out)
        save_tokenizer(tokenizer, out, max_positions_of(out))
        if (Path(cfg.student) / RECORD_NAME).exists():
            shutil.copy2(Path(cfg.student) / RECORD_NAME, out / RECORD_NAME)
        checked_on = {"inputs": parity_inputs, "rows": len(texts), "accuracy_measured": labels is not None}
        manifest = _manifest(cfg, out, order, ctx, parity, record, max_length, checked_on)
        atomic_write_json(out / MANIFEST, manifest)
    return {"output": cfg.output, **manifest}
