"""kdship: distill a large transformer into a small, fast, deployable one."""

__version__ = "0.1.0"
