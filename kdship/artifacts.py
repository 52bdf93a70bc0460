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
SIDECAR = ".kdship.json"  # beside a file kdship writes (<file>.kdship.json): its settings and counts


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    if path.is_dir():
        raise KdshipError(f"{path} is a folder; give a file path, not a folder")
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
    if out.exists() and not out.is_dir():
        raise KdshipError(f"output {out} is a file, so nothing can be written under it; give a folder (-o DIR)")
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
    try:
        yield tmp
        readable_as_umask_says(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def readable_as_umask_says(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (0755/0644 under 022): mkdtemp makes 0700 folders and
    transformers writes model.safetensors 0600, and another user (a container serving the model) must read them."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("kdship", "torch", "transformers", "tokenizers", "datasets", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """kdship.json: the resolved config, versions, data and teacher identity, metrics. Later commands read it."""
    atomic_write_json(Path(folder) / RECORD_NAME, {"kdship_version": 1, "versions": library_versions(), **record})


def with_relative_sources(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The record with each local data source also stated relative to `folder` (where the record will live), so
    that a tree moved as a whole (data and models together) still finds its data."""
    data = {name: ({**entry, "relative": os.path.relpath(entry["source"], Path(folder).resolve())}
                   if isinstance(entry, dict) and isinstance(entry.get("source"), str)
                   and Path(entry["source"]).is_absolute() else entry)
            for name, entry in (record.get("data") or {}).items()}
    return {**record, "data": data} if data else record


def recorded_source(record: dict[str, Any], split: str, folder: Path) -> str | None:
    """The data a record names for `split` (train, eval): its absolute path, or where its path relative to the
    record's folder now leads when the tree was moved; the absolute one (for the error) when neither exists."""
    entry = (record.get("data") or {}).get(split) or {}
    source, relative = entry.get("source"), entry.get("relative")
    if source and not Path(source).exists() and relative and (Path(folder) / relative).exists():
        return str((Path(folder) / relative).resolve())
    return source


def read_record(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD_NAME
    return read_json(path) if path.is_file() else None
