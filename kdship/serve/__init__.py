"""Serving: a built-in HTTP server (`kdship serve`) and Triton model repositories (`kdship deploy triton`)."""
