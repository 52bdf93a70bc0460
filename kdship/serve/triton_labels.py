"""Triton Python-backend model after the classifier (copied into the repository as `model.py`): logits in, the
label name and the probabilities out, so the ensemble answers what kdship serve answers. Only numpy is needed
inside the Triton image; `labels_and_probabilities` is what the tests call directly."""

from __future__ import annotations

import json

import numpy as np


def labels_and_probabilities(logits: np.ndarray, label_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[batch, labels] logits -> (object array [batch, 1] of UTF-8 label names, float32 [batch, labels])."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = (shifted / shifted.sum(-1, keepdims=True)).astype(np.float32)
    names = np.array([[label_names[i].encode("utf-8")] for i in probabilities.argmax(-1)], dtype=object)
    return names, probabilities


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.label_names = json.loads(config["parameters"]["labels"]["string_value"])

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils  # only exists inside Triton

        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float64)
            names, probabilities = labels_and_probabilities(logits, self.label_names)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("LABEL", names), pb_utils.Tensor("PROBABILITIES", probabilities)]))
        return responses
