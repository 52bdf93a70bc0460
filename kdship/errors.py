"""Typed errors: the library raises these, the CLI turns them into one line and an exit code."""


def not_a_folder(path: object) -> str:
    """Why a path given as a folder is not one, in words: it is a file, a broken link, or not there."""
    import os
    from pathlib import Path

    path = Path(str(path))
    if path.is_file():
        return f"{path} is a file, not a folder"
    if os.path.lexists(path) and not path.exists():
        return f"{path} is a broken link or a link loop"
    return f"{path} not found"


class KdshipError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 2


class ConfigError(KdshipError):
    """A config, recipe or flag is invalid."""


class DataError(KdshipError):
    """A data file is missing, empty, malformed or lacks a column."""


class ModelError(KdshipError):
    """A model path, shape spec, label count or tokenizer does not fit."""


class CheckFailed(KdshipError):
    """A check the user asked for ran and failed (parity, budgets): exit 1, not a usage error."""

    exit_code = 1


class MissingExtra(KdshipError):
    """A command needs an optional dependency that is not installed."""


def require_extra(extra: str, command: str, *modules: str) -> None:
    """Import `modules` or stop with the one line that names the pip extra providing them."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(f"{command} needs {module}, which is not installed; pip install 'kdship[{extra}]'") from None
