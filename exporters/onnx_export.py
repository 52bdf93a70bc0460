"""ONNX through torch.onnx's dynamo exporter, with batch and sequence axes that really are dynamic.

Why torch.onnx and not Optimum: Optimum's exporter (optimum-onnx) requires transformers<4.58 and kdship runs on
transformers 5. The dynamo exporter is PyTorch's supported path; parity is checked on every export anyway."""

from __future__ import annotations

from pathlib import Path

import logging
import warnings

import torch

from kdship.errors import CheckFailed
from kdship.exporters import ExportContext, Tolerance, register_exporter

class LogitsOnly(torch.nn.Module):
    """The classifier with named tensor inputs and its logits as output (`logits`), and, for a model with early
    exits, every exit's logits too (`exit_logits`, [batch, exits, labels], shallowest exit first)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        exits = getattr(out, "exit_logits", None)
        return out.logits if exits is None else (out.logits, torch.stack(exits, 1))


def output_names_for(model: torch.nn.Module) -> list[str]:
    """logits, and exit_logits for a model with early exits (kdship.early_exit)."""
    from kdship.early_exit import early_exit_settings

    return ["logits", "exit_logits"] if early_exit_settings(model.config) else ["logits"]


def input_names_for(tokenizer, config) -> list[str]:
    """The model's tensor inputs: ids and mask, plus segment ids when the model and tokenizer both use them."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names and getattr(config, "type_vocab_size", 0) > 0:
        names.append("token_type_ids")
    return names


def _example(ctx: ExportContext, names: list[str]) -> tuple[torch.Tensor, ...]:
    # Padding in the example matters: a mask of all ones can be specialised away while tracing.
    enc = ctx.tokenizer(["a short one", "an example that is a little longer than the first"], padding=True,
                        return_tensors="pt")
    return tuple(enc[n] for n in names)


def _name_dynamic_axes(path: Path) -> None:
    """torch.export names symbolic dims s0, s1, ...: call them batch and sequence, as users and servers expect."""
    import onnx

    model = onnx.load(str(path))
    first = next(v for v in model.graph.input if v.name == "input_ids").type.tensor_type.shape.dim
    names = {d.dim_param: n for d, n in zip(first, ("batch", "sequence")) if d.dim_param}  # a fixed dim stays fixed
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(model, str(path))


def check_dynamic_axes(path: Path) -> dict[str, list[str | int]]:
    """Every input must keep symbolic batch and sequence dims: a fixed dim is an export bug, not a warning."""
    import onnx

    shapes = {}
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if any(isinstance(d, int) for d in dims):
            raise CheckFailed(f"{path.name}: input {value.name} has fixed dims {dims}; the export lost its dynamic "
                              "axes (report this with the model type)")
        shapes[value.name] = dims
    return shapes


def exported_program(ctx: ExportContext, device: str = "cpu") -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export of the classifier with symbolic batch and sequence dims (shared by ONNX and AOTInductor)."""
    names = input_names_for(ctx.tokenizer, ctx.model.config)
    wrapper = LogitsOnly(ctx.model).to(device).eval()
    max_len = int(getattr(ctx.model.config, "max_position_embeddings", 512))
    batch = torch.export.Dim("batch", min=1, max=65536)
    sequence = torch.export.Dim("sequence", min=1, max=max_len)
    example = tuple(t.to(device) for t in _example(ctx, names))
    with torch.no_grad():
        program = torch.export.export(wrapper, example, dynamic_shapes={n: {0: batch, 1: sequence} for n in names})
    return program, names


TORCHSCRIPT_MAX_OPSET = 20


def fusion_opset(requested: int) -> int:
    return min(requested, TORCHSCRIPT_MAX_OPSET)


def export_for_fusion(ctx: ExportContext, path: Path) -> None:
    """The same model through torch.onnx's TorchScript exporter with eager attention: ONNX Runtime's transformer
    optimizer recognises attention (and embedding LayerNorm) in this graph's patterns, not in the dynamo graph's,
    so the fused variants start from it. Dynamic axes are declared and checked like the main export's. That
    exporter stops at opset 20, so a higher --opset gives 20 here (the details say which)."""
    import copy
    import warnings

    names = input_names_for(ctx.tokenizer, ctx.model.config)
    model = copy.deepcopy(ctx.model).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's business
        outputs = output_names_for(model)
        torch.onnx.export(LogitsOnly(model), _example(ctx, names), str(path), dynamo=False,
                          opset_version=fusion_opset(ctx.config.opset), input_names=names, output_names=outputs,
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names} | {o: {0: "batch"}
                                                                                           for o in outputs})
    check_dynamic_axes(path)


def _quiet_exporter() -> None:
    """The dynamo exporter logs a "torchvision is not installed. Skipping torchvision::<op>" warning per op of a
    library kdship does not use (importing torch resets the level, so it is set here); its real errors are
    exceptions, which the export reports. torch.export's own pytree code trips a deprecation it raised itself."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@register_exporter("onnx", "model.onnx", "fp32", Tolerance(max_abs=1e-4, min_agreement=1.0))
def export_onnx(ctx: ExportContext) -> Path:
    """ONNX (fp32) via torch.onnx dynamo export, dynamic batch and sequence axes."""
    _quiet_exporter()
    program, names = exported_program(ctx)
    path = ctx.out_dir / "model.onnx"
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ctx.config.opset, input_names=names,
                                     output_names=output_names_for(ctx.model), verbose=False)
    onnx_program.save(str(path))
    _name_dynamic_axes(path)
    ctx.details["onnx"] = {"inputs": check_dynamic_axes(path), "opset": ctx.config.opset}
    return path
