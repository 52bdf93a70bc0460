"""kdship: distill a large transformer into a small, fast, deployable one.

For Python users, each command is a library function: `kdship.train.train(TrainConfig)`,
`kdship.distill.distill(DistillConfig)`, and `kdship.distill_recipe(recipe, **overrides)` for any distill recipe,
pipeline or not (imported on first use, so `kdship --help` stays instant)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "distill_recipe":
        from kdship.pipeline import distill_recipe

        return distill_recipe
    raise AttributeError(f"module 'kdship' has no attribute {name!r}")
