"""The HTTP API: POST /v1/classify, GET /health, GET /metrics (Prometheus), GET /v1/model.

Bad requests get a 4xx JSON error naming the problem ({"error": {"code", "message"}}), never a 500 and never a
dead server; a failure of the model itself is a JSON 500 and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kdship.errors import require_extra

require_extra("serve", "kdship serve", "fastapi", "uvicorn", "prometheus_client")

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdship.models import under_weights_policy
from kdship.config import ServeConfig
from kdship.serve.batcher import DynamicBatcher
from kdship.serve.model import ServedModel
from kdship.serve.protocols import (PROTOCOL_PATHS, HttpError, ModelFailed, add_protocol_routes, check_text_limits,
                                    parse_json)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    return registry, {
        "requests": Counter("kdship_requests", "HTTP requests", ["endpoint", "status"], registry=registry),
        "latency": Histogram("kdship_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
        "batch": Histogram("kdship_batch_size", "Texts per model call", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
        "texts": Counter("kdship_texts", "Texts classified", registry=registry),
    }


async def _read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body is {declared} bytes; the limit is {limit}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, f"request body exceeds {limit} bytes")
    return body


def parse_classify(body: bytes, content_type: str, cfg: ServeConfig) -> list[str]:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise HttpError(415, f"content type must be application/json, got {content_type or 'none'!r}")
    payload = parse_json(body)
    try:
        texts = ClassifyRequest.model_validate(payload).texts
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HttpError(422, f"{where}: {first['msg']}; send {{\"texts\": [\"...\"]}}") from None
    check_text_limits(texts, cfg, "texts")
    return texts


def error_response(code: int, message: str) -> JSONResponse:
    """The one error shape of every endpoint."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=code)


def create_app(model: ServedModel, cfg: ServeConfig) -> FastAPI:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry, metrics = _metrics()
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdship-model")
    batcher = DynamicBatcher(model.predict, cfg.max_batch, cfg.max_wait_ms / 1000,
                             on_batch=metrics["batch"].observe)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.batching:
            batcher.start()
        yield
        if cfg.batching:
            await batcher.stop()
        model_thread.shutdown(wait=True)

    app = FastAPI(title=f"kdship: {model.name}", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # 404, 405: kdship's error shape too
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}; the API is "
                                             f"{', '.join(sorted(KNOWN_PATHS))}")

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as e:  # a bug, not the request: still JSON, still counted, and the server keeps serving
            response = error_response(500, f"internal error: {type(e).__name__}")
        route = request.scope.get("route")  # the path template: one series per endpoint, not per model name
        endpoint = route.path if route is not None else request.url.path if request.url.path in KNOWN_PATHS else "other"
        metrics["requests"].labels(endpoint, str(response.status_code)).inc()
        metrics["latency"].labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def predict(texts: list[str]) -> list[dict[str, Any]]:
        """Every protocol's one way to the model: through the batcher, or one call at a time (a TensorRT context,
        a fast tokenizer are not thread-safe) off the event loop, so /health keeps answering meanwhile."""
        try:
            if cfg.batching:
                predictions = await batcher.submit(texts)
            else:
                predictions = await asyncio.get_running_loop().run_in_executor(model_thread, model.predict, texts)
                metrics["batch"].observe(len(texts))
        except Exception as e:  # the model failed, not the request: the caller says so, and the server keeps serving
            raise ModelFailed(str(e)) from e
        metrics["texts"].inc(len(texts))
        return predictions

    async def read_body(request: Request) -> bytes:
        return await _read_bounded(request, cfg.max_body_bytes)

    @app.post("/v1/classify", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
    async def classify(request: Request):
        try:
            texts = parse_classify(await read_body(request), request.headers.get("content-type", ""), cfg)
            return {"model": model.name, "predictions": await predict(texts)}
        except HttpError as e:
            return error_response(e.code, str(e))
        except ModelFailed as e:
            return error_response(500, f"model failed: {e}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.name}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    async def describe():
        return {"name": model.name, "file": model.file.name, "backend": cfg.backend, "labels": model.label_names,
                "max_length": model.max_length, "batching": {"enabled": cfg.batching, "max_batch": cfg.max_batch,
                                                             "max_wait_ms": cfg.max_wait_ms},
                "limits": {"max_texts": cfg.max_texts, "max_text_chars": cfg.max_text_chars,
                           "max_body_bytes": cfg.max_body_bytes},
                "manifest": public_manifest(model.manifest)}

    add_protocol_routes(app, model, cfg, predict, read_body)
    return app


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The artifact's manifest as a client may see it: the build machine's paths reduced to their last part."""
    source = dict(manifest.get("source") or {})
    if source.get("student"):
        source["student"] = Path(source["student"]).name
    config = {k: (Path(v).name if isinstance(v, str) and Path(v).is_absolute() else v)
              for k, v in (manifest.get("config") or {}).items()}
    return {**manifest, "source": source, "config": config}


KNOWN_PATHS = {"/v1/classify", "/health", "/metrics", "/v1/model", "/v2/models/{name}", "/v2/models/{name}/infer",
               *PROTOCOL_PATHS}


def _check_port_free(host: str, port: int) -> int:
    """The port to serve on: `port` if it is free, or a free one picked now when port is 0 (so it can be printed)."""
    import errno
    import socket

    from kdship.errors import KdshipError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise KdshipError(f"--host {host!r} is not an address or a known host name; pass e.g. 127.0.0.1 or "
                              "0.0.0.0") from None
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise KdshipError(f"--host {host} is not an address of this machine; pass 127.0.0.1, 0.0.0.0 or one "
                                  "of its own addresses") from None
            raise KdshipError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None
        return s.getsockname()[1]


@under_weights_policy
def serve(cfg: ServeConfig) -> None:
    """Load the artifact and serve it until SIGINT/SIGTERM (in-flight requests are finished first)."""
    import uvicorn

    from kdship.serve.model import load_served_model

    model = load_served_model(cfg.artifact, cfg.backend, cfg.variant, cfg.threads, cfg.verify, cfg.exit_threshold,
                              cfg.exit_criterion)
    port = _check_port_free(cfg.host, cfg.port)
    app = create_app(model, cfg)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 address in a URL goes in brackets
    print(f"serving {model.name} ({model.file.name}, {cfg.backend}) on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=cfg.host, port=port, log_level="warning", timeout_graceful_shutdown=10)
