"""Output folders and files: atomic writes, staged directories, hashes, and the kdship.json record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from kdship.errors import KdshipError

RECORD_NAME = "kdship.json"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, data: Any) -> None:
    # allow_nan=False: Infinity/NaN are not JSON, and other tools would fail to read the file
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise KdshipError(f"output dir {out} already exists; pass --overwrite or choose another -o")


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; move it into place only if the block succeeds.

    A failure or interruption leaves no partial `out` (the temp folder is removed)."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging."))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; another user (a container) must read outputs
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("kdship", "torch", "transformers", "tokenizers", "datasets", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """kdship.json: the resolved config, versions, data and teacher identity, metrics. Later commands read it."""
    atomic_write_json(Path(folder) / RECORD_NAME, {"kdship_version": 1, "versions": library_versions(), **record})


def read_record(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD_NAME
    return read_json(path) if path.is_file() else None
