"""ONNX Runtime variants of the exported graph: transformer fusions, FP16, INT8 dynamic and INT8 static."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from kdship.exporters import ExportContext, Tolerance, register_exporter
from kdship.ui import without_log_message

# Kept in fp32 inside the fp16 model: their reductions overflow or lose too much in fp16 (a known BERT pitfall).
FP32_OPS = ["LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "SimplifiedLayerNormalization",
            "Softmax", "ReduceMean", "Pow", "Sqrt"]


def _optimizer(ctx: ExportContext, source: Path) -> Any:
    from onnxruntime.transformers import optimizer

    config = ctx.model.config
    return optimizer.optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                                    hidden_size=config.hidden_size)


def _fusions(model: Any) -> dict[str, int]:
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


@register_exporter("ort-opt", "model_optimized.onnx", "fp32", Tolerance(max_abs=1e-4, min_agreement=1.0))
def export_optimized(ctx: ExportContext) -> Path:
    """ONNX Runtime transformer optimizer: attention / LayerNorm / GELU fusions (fp32)."""
    from kdship.exporters.onnx_export import export_for_fusion, fusion_opset

    traced = ctx.out_dir / ".for-fusion.onnx"
    try:
        export_for_fusion(ctx, traced)
        model = _optimizer(ctx, traced)
    finally:
        traced.unlink(missing_ok=True)
    path = ctx.out_dir / "model_optimized.onnx"
    model.save_model_to_file(str(path))
    ctx.details["ort-opt"] = {"fused_operators": _fusions(model), "from": "TorchScript export, eager attention",
                              "opset": fusion_opset(ctx.config.opset)}
    return path


@register_exporter("fp16", "model_fp16.onnx", "fp16", Tolerance(max_abs=5e-2, min_agreement=0.99), needs="ort-opt")
def export_fp16(ctx: ExportContext) -> Path:
    """FP16 weights and math (fp32 inputs/outputs), LayerNorm and Softmax kept in fp32."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(ctx.files["ort-opt"])))  # the fused graph, converted (not optimised twice)
    model.convert_float_to_float16(keep_io_types=True, op_block_list=FP32_OPS)
    path = ctx.out_dir / "model_fp16.onnx"
    model.save_model_to_file(str(path))
    ctx.details["fp16"] = {"fp32_ops": FP32_OPS, "from": "model_optimized.onnx"}
    return path


@register_exporter("int8", "model_int8.onnx", "int8", Tolerance(max_abs=None, min_agreement=0.95),
                   needs="ort-opt")
def export_int8_dynamic(ctx: ExportContext) -> Path:
    """INT8 dynamic quantisation of MatMul weights (activations quantised at run time; CPU)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    path = ctx.out_dir / "model_int8.onnx"
    # shape inference cannot type the fused (com.microsoft) Attention outputs; they are fp32. ORT suggests its
    # pre-processing for every graph, but this one is the optimised graph already: the hint would only mislead
    with without_log_message("Please consider to run pre-processing before quantization"):
        quantize_dynamic(str(ctx.files["ort-opt"]), str(path), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    ctx.details["int8"] = {"weights": "int8 per-channel", "activations": "dynamic"}
    return path


class _Calibration:
    """onnxruntime's CalibrationDataReader over feeds made from real samples."""

    def __init__(self, feeds: list[dict[str, Any]]):
        self._feeds: Iterator[dict[str, Any]] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


@register_exporter("int8-static", "model_int8_static.onnx", "int8",
                   Tolerance(max_abs=None, min_agreement=0.95), needs="onnx")
def export_int8_static(ctx: ExportContext) -> Path:
    """INT8 static quantisation (QDQ) with activation ranges calibrated on real samples."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = ctx.out_dir / ".int8-static-prepared.onnx"
    quant_pre_process(str(ctx.files["onnx"]), str(prepared), skip_symbolic_shape=True)
    path = ctx.out_dir / "model_int8_static.onnx"
    try:
        quantize_static(str(prepared), str(path), _Calibration(ctx.calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=["MatMul", "Gemm"],  # LayerNorm/Softmax/GELU stay fp32: accuracy
                        extra_options={"ActivationSymmetric": True})
    finally:
        prepared.unlink(missing_ok=True)
    ctx.details["int8-static"] = {"calibration_samples": sum(len(f["input_ids"]) for f in ctx.calibration),
                                  "method": "MinMax", "format": "QDQ", "quantized_ops": ["MatMul", "Gemm"]}
    return path
