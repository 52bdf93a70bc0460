"""Train a BERT-style WordPiece tokenizer on the run's own texts, for models made from a shape spec (no hub), and
save any tokenizer so that other tools load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
END_OF_TEXT = "<|endoftext|>"  # a byte-level BPE's one special token: end of text, and padding (never a target)


def train_wordpiece(texts: Iterable[str], vocab_size: int):
    """A lower-casing WordPiece tokenizer with [CLS] a [SEP] (b [SEP]) templates, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def train_byte_bpe(texts: Iterable[str], vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer for causal LMs: any text round-trips (no unknown token, spaces and
    case kept, as generation needs), <|endoftext|> ends every text and pads batches."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, unk_token=None, model_input_names=["input_ids", "attention_mask"])


# transformers 5 names the class of a tokenizer built from a `tokenizers` object "TokenizersBackend", a name that
# transformers 4 and Optimum cannot resolve; PreTrainedTokenizerFast is the same thing under a name both know
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer: Any, folder: Path, max_positions: int | None) -> None:
    """save_pretrained, so that transformers 4.x and 5.x and Optimum load the folder: a class name they all know,
    and `model_max_length` from the model's positions (unset, it is 1e30, and `truncation=True` in a
    transformers pipeline lets a long text through to crash the position embeddings)."""
    if max_positions and not tokenizer.model_max_length <= max_positions:
        tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(folder)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = PORTABLE_CLASSES.get(config.get("tokenizer_class"), config.get("tokenizer_class"))
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def max_positions_of(model_folder: Path) -> int | None:
    """The model's position limit from its config.json (None when it has none: relative-position models)."""
    config = json.loads((Path(model_folder) / "config.json").read_text(encoding="utf-8"))
    return config.get("max_position_embeddings") or config.get("n_positions")
