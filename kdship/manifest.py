"""An artifact's manifest.json, read and checked: it is JSON holding the variants and the sha256 of every file, and
the files a command uses are verified against it before use (once per file per process), so a model changed after
export (a damaged copy, a tampered file) is refused instead of served, benched or gated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdship.artifacts import sha256_file
from kdship.errors import DataError, ModelError

MANIFEST = "manifest.json"
# files already hashed in this process: (path, size, mtime) -> sha256
_HASHED: dict[tuple[str, int, int], str] = {}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none; a damaged one is a one-line error."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-export the artifact with kdship export") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("variants"), dict)
            and isinstance(manifest.get("files"), dict)):
        raise DataError(f"{path} is not a kdship manifest (it lacks variants or files); re-export the artifact "
                        "with kdship export")
    broken = next((name for name, v in manifest["variants"].items() if not (
        isinstance(v, dict) and isinstance(v.get("file"), str) and isinstance(v.get("parity"), dict))), None)
    if broken is not None or not all(isinstance(h, str) for h in manifest["files"].values()):
        what = f"variant {broken!r} lacks its file or parity" if broken is not None else "a file hash is not a string"
        raise DataError(f"{path} is damaged ({what}); re-export the artifact with kdship export")
    return manifest


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def files_in_use(manifest: dict[str, Any], model_file: str | None) -> list[str]:
    """What a command that runs `model_file` reads: that file (with its external data, model.onnx.data), and every
    file that is no variant's model (config, tokenizer, record). None: every file (the gate checks all)."""
    variant_files = {v["file"] for v in manifest["variants"].values()}
    belongs = lambda name, model: name == model or name.startswith(f"{model}.")  # noqa: E731
    return [name for name in manifest["files"] if model_file is None or belongs(name, model_file)
            or not any(belongs(name, v) for v in variant_files)]


def changed_files(folder: Path, manifest: dict[str, Any], model_file: str | None) -> list[str]:
    """What is wrong with the files a command running `model_file` uses (None: every file): a model file the
    manifest holds no sha256 for (a hash removed from the manifest must not let a changed model through), or a
    file that is missing or differs from the sha256 the export recorded."""
    wanted = [model_file] if model_file else sorted({v["file"] for v in manifest["variants"].values()})
    problems = [f"{name} has no sha256 in the manifest" for name in wanted if name not in manifest["files"]]
    for name in files_in_use(manifest, model_file):
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _sha256(path) != manifest["files"][name]:
            problems.append(f"{name} differs from the file that was exported (sha256)")
    return problems


def verify(folder: Path, manifest: dict[str, Any], model_file: str | None) -> None:
    problems = changed_files(folder, manifest, model_file)
    if problems:
        raise ModelError(f"{folder}: {problems[0]}; re-export the artifact (or pass --no-verify to use it as it "
                         "is)")
