"""Typed errors: the library raises these, the CLI turns them into one line and an exit code."""


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
