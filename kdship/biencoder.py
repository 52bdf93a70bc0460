"""Dual-tower (bi-encoder) matching: one shared encoder embeds each side of a sentence pair (mean pooling over real
tokens, as sentence-transformers models such as all-MiniLM-L6-v2 do), and the pair is scored from the two embeddings.

Two heads, chosen by `match_loss`:
- in_batch: the logits of a batch are the scaled cosine similarities of every left side with every right side
  ([batch, batch]); each row's target is its own partner (the diagonal), the other partners are its negatives
  (multiple-negatives ranking loss, Henderson et al. 2017). No labels needed: the data is positive pairs.
- classify: labelled pairs; logits = W [u; v; |u - v|] (Sentence-BERT's classification objective, Reimers &
  Gurevych 2019).

Either way the model returns `.logits` and `.loss` like a transformers classifier, so soft-label KD, reverse
distillation and sample-value selection apply unchanged: for in_batch, KD matches the teacher's distribution over
the batch's partners. The folder is the encoder's save_pretrained plus a `kdship_biencoder` entry in config.json
(pooling, scale, label names) and, for the classify head, `biencoder_head.safetensors`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

from kdship.data import SECOND, partners  # SECOND: suffix of the right side's inputs (input_ids_b, ...)

SETTINGS_KEY = "kdship_biencoder"
HEAD_WEIGHTS = "biencoder_head.safetensors"
SCALE = 20.0  # cosine similarity x 20: sentence-transformers' MultipleNegativesRankingLoss default


def biencoder_settings(config: Any) -> dict[str, Any] | None:
    """The bi-encoder settings saved in a config, or None for a model that is not a kdship bi-encoder."""
    return getattr(config, SETTINGS_KEY, None)


@dataclass
class BiEncoderOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    # per layer, both sides stacked on the batch axis ([2 * batch, seq, width]); the sides are padded to one length
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class BiEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, label_names: list[str] | None = None, scale: float = SCALE):
        super().__init__()
        self.encoder = encoder
        self.label_names = label_names
        self.scale = scale
        width = encoder.config.hidden_size
        self.classifier = nn.Linear(3 * width, len(label_names)) if label_names else None
        if label_names:  # predict_logits sizes its output by config.num_labels
            encoder.config.num_labels = len(label_names)
        setattr(encoder.config, SETTINGS_KEY, {"pooling": "mean", "scale": scale, "label_names": label_names})

    @property
    def config(self) -> Any:
        return self.encoder.config

    def embed(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
              **outputs: bool) -> tuple[Tensor, Any]:
        """(mean of the last hidden states over real tokens, the encoder's output)."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra, **outputs)
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1.0), out

    def forward(self, input_ids: Tensor, attention_mask: Tensor, input_ids_b: Tensor, attention_mask_b: Tensor,
                token_type_ids: Tensor | None = None, token_type_ids_b: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> BiEncoderOutput:
        outputs = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        u, left = self.embed(input_ids, attention_mask, token_type_ids, **outputs)
        v, right = self.embed(input_ids_b, attention_mask_b, token_type_ids_b, **outputs)
        if self.classifier is not None:
            logits = self.classifier(torch.cat([u, v, (u - v).abs()], -1))
            loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        else:
            logits = self.scale * F.normalize(u.float(), dim=-1) @ F.normalize(v.float(), dim=-1).T
            loss = F.cross_entropy(logits, partners(len(logits), logits.device))
        return BiEncoderOutput(loss=loss, logits=logits, hidden_states=_stack(left.hidden_states, right.hidden_states),
                               attentions=_stack(left.attentions, right.attentions))

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The encoder's folder and the pair head beside it; `state_dict` (this module's, e.g. gathered from FSDP
        shards) replaces the live weights."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        self.encoder.save_pretrained(folder, state_dict=part("encoder."))
        if self.classifier is not None:
            save_file({k: v.contiguous() for k, v in part("classifier.").items()}, Path(folder) / HEAD_WEIGHTS)


def _stack(left: tuple[Tensor, ...] | None, right: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
    return None if left is None else tuple(torch.cat([a, b]) for a, b in zip(left, right))


def build_biencoder(source: str | None = None, config: Any = None, label_names: list[str] | None = None,
                    encoder_kwargs: dict[str, Any] | None = None, keep_head: bool = True) -> BiEncoder:
    """A bi-encoder from a folder or hub id (a kdship bi-encoder, or any encoder, e.g. a sentence-transformers
    model, whose head is then new) or from a fresh config. keep_head=False drops a saved pair-classification head."""
    from transformers import AutoModel

    kwargs = encoder_kwargs or {}
    if source is None:
        return BiEncoder(AutoModel.from_config(config, **kwargs), label_names)
    from kdship.models import check_weights_loaded

    encoder, info = AutoModel.from_pretrained(source, output_loading_info=True, **kwargs)
    check_weights_loaded(encoder, info["missing_keys"], source)
    saved = biencoder_settings(encoder.config) or {}
    names = saved.get("label_names") if keep_head else None
    model = BiEncoder(encoder, label_names or names, saved.get("scale", SCALE))
    head = Path(source) / HEAD_WEIGHTS
    if model.classifier is not None and names == model.label_names and head.is_file():
        from safetensors.torch import load_file

        model.classifier.load_state_dict(load_file(head))
    return model


@torch.no_grad()
def embed_pairs(model: BiEncoder, tokenizer: Any, encoded: Any, batch_size: int, device: torch.device,
                autocast: Any = None) -> tuple[Tensor, Tensor]:
    """Both sides' embeddings for every pair, in the data's order."""
    from kdship.data import iterate_batches, model_inputs

    model.eval()
    left = torch.empty(len(encoded.features), model.config.hidden_size)
    right = torch.empty_like(left)
    for indices, batch in iterate_batches(tokenizer, encoded, batch_size):
        batch = {k: v.to(device) for k, v in model_inputs(batch).items()}
        sides = {k: v for k, v in batch.items() if not k.endswith(SECOND)}
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            u, _ = model.embed(**sides)
            v, _ = model.embed(**{k.removesuffix(SECOND): batch[k] for k in batch if k.endswith(SECOND)})
        rows = torch.tensor(indices)
        left[rows], right[rows] = u.float().cpu(), v.float().cpu()
    return left, right


def similarities(left: Tensor, right: Tensor) -> Tensor:
    """Cosine similarity of every left side to every right side."""
    return F.normalize(left, dim=-1) @ F.normalize(right, dim=-1).T


def retrieval_metrics(left: Tensor, right: Tensor) -> dict[str, float]:
    """Each left side retrieves among all right sides of the set: recall@1, recall@5 and MRR of its partner."""
    return ranking_metrics(similarities(left, right))


def ranking_metrics(scores: Tensor) -> dict[str, float]:
    """recall@1, recall@5 and MRR of the diagonal (each row's partner) in a square score matrix."""
    partner_score = scores.diagonal().unsqueeze(1)
    rank = (scores > partner_score).sum(1) + 1  # 1 = the partner scores highest
    return {"recall_at_1": rank.eq(1).float().mean().item(), "recall_at_5": rank.le(5).float().mean().item(),
            "mrr": (1.0 / rank.float()).mean().item()}
