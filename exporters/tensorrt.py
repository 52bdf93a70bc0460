"""TensorRT engines (`model.plan`) from the exported ONNX, with either TensorRT (`tensorrt`) or TensorRT-RTX
(`tensorrt_rtx`): same builder / parser / runtime API.

- Strongly typed network from an FP16 ONNX (standard ONNX ops only: TensorRT cannot parse ONNX Runtime's fused
  contrib ops). TensorRT 11 is always strongly typed and has no FP16 builder flag; TensorRT 10 gets the
  STRONGLY_TYPED creation flag.
- One optimisation profile over batch and sequence (min / opt / max), so the engine keeps dynamic shapes.
- A timing cache kept per GPU and TensorRT version under ~/.cache/kdship/tensorrt and reused between builds.
- The engine's GPU, compute capability and TensorRT version are recorded; loading it elsewhere is a clear error
  rather than a crash or silently wrong numbers."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdship.errors import ConfigError
from kdship.exporters import ExportContext, Runner, Tolerance, register_exporter
from kdship.exporters.ort_variants import FP32_OPS

MODULES = ("tensorrt", "tensorrt_rtx")
METADATA = "model.plan.json"  # beside the engine: where and with what it was built
CACHE_DIR = Path.home() / ".cache" / "kdship" / "tensorrt"


def trt_module() -> Any | None:
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _unavailable() -> str | None:
    import torch

    if trt_module() is None:
        return ("neither tensorrt nor tensorrt_rtx is importable; pip install 'kdship[tensorrt]' "
                "(or tensorrt-rtx) on a machine with an NVIDIA GPU")
    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU with CUDA, and none is visible here"
    return None


def gpu_identity(trt: Any) -> dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "tensorrt_module": trt.__name__, "tensorrt_version": trt.__version__}


def _fp16_onnx(ctx: ExportContext) -> Path:
    """The plain exported graph in fp16 (LayerNorm/Softmax kept fp32), standard ops only."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(ctx.files["onnx"])), keep_io_types=True, op_block_list=FP32_OPS)
    path = ctx.out_dir / ".model_fp16_plain.onnx"
    onnx.save(model, str(path))
    return path


def _network(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    flags = 0
    if int(trt.__version__.split(".")[0]) == 10:  # TensorRT 11 is always strongly typed (flag deprecated)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT could not parse the ONNX graph: {errors}")
    return network, parser


def profile_shapes(cfg: Any, max_position: int) -> dict[str, list[int]]:
    """min / opt / max (batch, sequence) of the engine's one optimisation profile."""
    max_seq = min(cfg.trt_max_seq, max_position)
    opt = [min(cfg.trt_opt_batch, cfg.trt_max_batch), min(cfg.trt_opt_seq, max_seq)]
    return {"min": [1, 1], "opt": opt, "max": [cfg.trt_max_batch, max_seq]}


def _profile(builder: Any, network: Any, shapes: dict[str, list[int]]) -> Any:
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        profile.set_shape(network.get_input(i).name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    return profile


@register_exporter("tensorrt", "model.plan", "fp16", Tolerance(max_abs=5e-2, min_agreement=0.99), needs="onnx",
                   load=lambda path: tensorrt_runner(path), available=_unavailable)
def export_tensorrt(ctx: ExportContext) -> Path:
    """TensorRT / TensorRT-RTX engine, strongly typed fp16, dynamic batch/sequence profile, timing cache."""
    trt = trt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    onnx_path = _fp16_onnx(ctx)
    try:
        network, _parser = _network(trt, builder, logger, onnx_path)
        config = builder.create_builder_config()
        shapes = profile_shapes(ctx.config, ctx.model.config.max_position_embeddings)
        config.add_optimization_profile(_profile(builder, network, shapes))
        identity = gpu_identity(trt)
        cache_path = CACHE_DIR / f"{identity['gpu'].replace(' ', '_')}-{trt.__name__}-{trt.__version__}.cache"
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ConfigError("TensorRT failed to build the engine (see its log above)")
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(cache_path)  # a torn cache would fail the next build (ignore_mismatch=False)
    finally:
        onnx_path.unlink(missing_ok=True)
    path = ctx.out_dir / "model.plan"
    path.write_bytes(bytes(plan))
    meta = {**identity, "profile": shapes, "timing_cache": str(cache_path)}
    (ctx.out_dir / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    ctx.details["tensorrt"] = meta
    return path


def check_engine_matches(path: Path) -> tuple[Any, dict[str, Any]]:
    """The engine runs only on the GPU model and TensorRT version it was built with: say so instead of crashing."""
    trt = trt_module()
    meta_path = path.parent / METADATA
    if trt is None:
        raise ConfigError(f"{path} is a TensorRT engine but TensorRT is not installed here; pip install "
                          "'kdship[tensorrt]'")
    built = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    here = gpu_identity(trt)
    keys = ("gpu", "compute_capability", "tensorrt_module", "tensorrt_version")
    changed = [k for k in keys if built.get(k) != here[k]]
    if changed:
        raise ConfigError(f"{path.name} was built for {built.get('gpu')} (sm {built.get('compute_capability')}) with "
                          f"{built.get('tensorrt_module')} {built.get('tensorrt_version')}; this machine has "
                          f"{here['gpu']} (sm {here['compute_capability']}) with {here['tensorrt_module']} "
                          f"{here['tensorrt_version']}. Rebuild it here: kdship export --to tensorrt")
    return trt, built


def tensorrt_runner(path: Path) -> Runner:
    import torch

    trt, built = check_engine_matches(path)
    limits = built.get("profile", {}).get("max")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ConfigError(f"TensorRT could not load {path}; rebuild it with kdship export --to tensorrt")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        shape = next(iter(feeds.values())).shape
        if limits and (shape[0] > limits[0] or shape[1] > limits[1]):
            raise ConfigError(f"batch {shape[0]} x sequence {shape[1]} is outside the engine's profile (max "
                              f"{limits[0]} x {limits[1]}); re-export with larger trt_max_batch / trt_max_seq")
        with torch.cuda.stream(stream):  # inputs, casts and the engine on one stream: no race between them
            inputs = {}
            for name, value in feeds.items():
                tensor = torch.from_numpy(value).cuda()
                if engine.get_tensor_dtype(name) == trt.DataType.INT32:
                    tensor = tensor.to(torch.int32)
                inputs[name] = tensor.contiguous()
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise ConfigError(f"TensorRT refused input {name} of shape {tuple(tensor.shape)}")
                context.set_tensor_address(name, inputs[name].data_ptr())
            outputs = {}  # every output needs a buffer (exit_logits too, for a model with early exits)
            for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
                if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32,
                                                device="cuda")
                    context.set_tensor_address(name, outputs[name].data_ptr())
            logits = outputs["logits"]
            if not context.execute_async_v3(stream.cuda_stream):
                raise ConfigError("TensorRT failed to run the engine (see its log above)")
        stream.synchronize()
        return logits.cpu().numpy()

    return run
