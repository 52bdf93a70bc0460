"""kdship's folders in the tools users already have: a plain transformers tokenizer class, pipelines on long input."""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerFast, pipeline


def test_saved_tokenizer_loads_as_a_plain_fast_tokenizer_and_truncates_at_the_models_positions(teacher_dir):
    config = json.loads((teacher_dir / "tokenizer_config.json").read_text())
    positions = json.loads((teacher_dir / "config.json").read_text())["max_position_embeddings"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not transformers 5's "TokenizersBackend"
    assert config["model_max_length"] == positions
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    long_text = "a good film " * 400
    assert len(tokenizer(long_text, truncation=True)["input_ids"]) == positions
    classify = pipeline("text-classification", model=str(teacher_dir), device="cpu")
    labels = json.loads((teacher_dir / "config.json").read_text())["id2label"].values()
    assert classify(long_text, truncation=True)[0]["label"] in labels


def test_exported_artifact_tokenizer_is_portable_too(artifact):
    config = json.loads((artifact / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == json.loads((artifact / "config.json").read_text())["max_position_embeddings"]
