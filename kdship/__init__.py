"""kdship: distill a large transformer into a small, fast, deployable one.

The commands' library functions, for Python users: `kdship.train(TrainConfig)`, `kdship.distill(DistillConfig)`,
`kdship.distill_recipe(recipe, **overrides)` (any distill recipe, pipeline or not). Imported on first use, so
`kdship --help` stays instant."""

__version__ = "0.1.0"

_LAZY = {"train": "kdship.train", "distill": "kdship.distill", "distill_recipe": "kdship.pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdship' has no attribute {name!r}")
