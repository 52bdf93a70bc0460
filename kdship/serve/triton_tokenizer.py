"""Triton Python-backend model that turns raw text into token ids (copied into the repository as `model.py`).

It pads every text to the same `max_length`, so Triton's dynamic batcher can stack requests into one batch for the
classifier. Only `tokenizers` and numpy are needed inside the Triton image. The pure function `encode` is what the
tests call directly; `TritonPythonModel` is the thin adapter Triton calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_tokenizer(folder: Path, max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    settings = json.loads((folder / "kdship_tokenizer.json").read_text())
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=settings["pad_id"], pad_token=settings["pad_token"])
    return tokenizer


def encode(tokenizer, texts: list[str], output_names: list[str]) -> dict[str, np.ndarray]:
    """Texts -> int64 arrays [batch, max_length] named as the classifier's inputs."""
    encodings = tokenizer.encode_batch(texts)
    arrays = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
              "token_type_ids": [e.type_ids for e in encodings]}
    return {name: np.asarray(arrays[name], dtype=np.int64) for name in output_names}


def decode_text_input(array: np.ndarray) -> list[str]:
    """Triton hands TYPE_STRING inputs as an object array of bytes, shape [batch, 1]."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.output_names = [o["name"] for o in config["output"]]
        folder = Path(args["model_repository"]) / args["model_version"]
        max_length = int(config["parameters"]["max_length"]["string_value"])
        self.tokenizer = load_tokenizer(folder, max_length)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils  # only exists inside Triton

        responses = []
        for request in requests:  # one request's bad text is that request's error, not the whole batch's
            try:
                texts = decode_text_input(pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy())
            except UnicodeDecodeError as e:
                error = pb_utils.TritonError(f"TEXT is not UTF-8 text (byte {e.start}); send UTF-8 strings")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            arrays = encode(self.tokenizer, texts, self.output_names)
            tensors = [pb_utils.Tensor(name, value) for name, value in arrays.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
