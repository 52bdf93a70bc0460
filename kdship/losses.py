"""Distillation losses: pure functions of tensors, in a registry keyed by name (`kdship list losses`).

Each registered loss takes a `LossInputs` (only tensors and a temperature) and returns a scalar. Adding a loss is
one function and one decorator. `needs` says which model outputs the loss reads, so the distill step asks the
models for hidden states or attention maps only when some loss uses them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdship.errors import ConfigError

VARIANCE_FLOOR = 0.1  # hidden_mse: no dimension's variance counts as less than this fraction of its layer's median


@dataclass
class LossInputs:
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None
    teacher_token_ids: Tensor | None = None  # top-K teacher cache: the vocabulary ids teacher_logits are given for
    labels: Tensor | None = None  # class ids; for MLM, token ids with -100 on unmasked positions
    attention_mask: Tensor | None = None  # [batch, seq], 1 on real tokens
    student_hidden: Sequence[Tensor] = ()  # already projected to the teacher's width, paired with teacher_hidden
    teacher_hidden: Sequence[Tensor] = ()
    student_attentions: Sequence[Tensor] = ()  # [batch, heads, seq, seq] probabilities, paired
    teacher_attentions: Sequence[Tensor] = ()
    student_qkv: Sequence[Tensor] = ()  # one layer's query, key and value projections, each [batch, seq, width]
    teacher_qkv: Sequence[Tensor] = ()
    relation_heads: int = 1
    temperature: float = 1.0
    beta: float = 0.5  # jsd's interpolation (GKD): 0 is forward KL, 1 reverse KL


@dataclass(frozen=True)
class LossDef:
    name: str
    fn: Callable[[LossInputs], Tensor]
    needs: frozenset[str]  # subset of {"logits", "hidden", "attentions", "qkv", "teacher"}
    summary: str


LOSSES: dict[str, LossDef] = {}


def register_loss(name: str, needs: Sequence[str]) -> Callable:
    def wrap(fn: Callable[[LossInputs], Tensor]) -> Callable[[LossInputs], Tensor]:
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        LOSSES[name] = LossDef(name, fn, frozenset(needs), summary)
        return fn

    return wrap


def get_loss(name: str) -> LossDef:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}'; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# ---- pure tensor functions ---------------------------------------------------------------------------------------


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """KL(p_teacher^T || p_student^T) · T², averaged over rows (Hinton et al. 2015, "Distilling the Knowledge in a
    Neural Network"). The T² keeps gradient size independent of T. `mask` selects rows (e.g. masked MLM positions)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_row = (t.exp() * (t - s)).sum(-1)
    return _masked_mean(per_row, mask) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """KL(p_student^T || p_teacher^T) · T², averaged over rows: mode-seeking, the student puts its mass where the
    teacher's is high instead of covering all of it (MiniLLM, Gu et al. 2024)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _masked_mean((s.exp() * (s - t)).sum(-1), mask) * temperature**2


def generalised_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0,
                    mask: Tensor | None = None) -> Tensor:
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL computes it: with the mixture
    M = beta·p_teacher + (1 - beta)·p_student, beta·KL(p_teacher || M) + (1 - beta)·KL(p_student || M), · T².
    Its ends are defined as the KLs it tends to in direction: beta 0 is forward KL(p_teacher || p_student), beta 1
    reverse KL(p_student || p_teacher); 0.5 is the symmetric JSD (at most log 2 per row before T²)."""
    if beta == 0:
        return soft_kl(student_logits, teacher_logits, temperature, mask)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
    per_row = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return _masked_mean(per_row, mask) * temperature**2


def total_variation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    mask: Tensor | None = None) -> Tensor:
    """½·Σ|p_teacher^T - p_student^T| per row, averaged: a bounded distance in [0, 1] (DistiLLM's comparison)."""
    s = F.softmax(student_logits.float() / temperature, dim=-1)
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return _masked_mean(0.5 * (t - s).abs().sum(-1), mask)


def hidden_mse(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """mean over layer pairs of ||h_s W - h_t||² / width on real tokens, as TinyBERT (Jiao et al. 2020) writes it.
    Its scale is the teacher's: a few outlier dimensions of large magnitude (common in pretrained encoders) make
    most of it. Projections W are applied by the caller; this function is pure."""
    losses = [_masked_mean(((s.float() - t.float()) ** 2).mean(-1), mask) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(losses).mean()


def hidden_mse_normalised(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """hidden_mse with each dimension's error divided by the teacher's variance of that dimension over the batch's
    real tokens: the fraction of the teacher's variance the student misses, averaged over dimensions. It does not
    depend on the teacher's activation magnitudes; 1.0 is what predicting the teacher's mean state scores. A
    dimension's variance is floored at a tenth of the layer's median variance: a dimension the teacher holds
    near-constant (fine-tuned sentence encoders have some at 1e-7) is a constant the projection's bias learns,
    and divided by its own variance it would outweigh every other dimension and, through gradient clipping,
    the prediction losses beside it (measured at init: gradient norm 38 at a 1e-3 floor vs 2.2 at 0.1, kd 1.0)."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        t = t.float()
        variance = _masked_variance(t, mask).detach()
        variance = variance.clamp_min(VARIANCE_FLOOR * variance.median().clamp_min(1e-12))
        losses.append(_masked_mean((((s.float() - t) ** 2) / variance).mean(-1), mask))
    return torch.stack(losses).mean()


def hidden_cosine(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """mean over layer pairs of 1 - cos(h_s W, h_t) on real tokens (DistilBERT's cosine embedding loss, Sanh et al. 2019)."""
    losses = [
        _masked_mean(1 - F.cosine_similarity(s.float(), t.float(), dim=-1), mask)
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(losses).mean()


def attention_kl(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """mean over layer pairs of KL(A_t || A_s) per query row on real tokens (MiniLM, Wang et al. 2020).
    When head counts differ, both sides are averaged over heads first."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        s_log = torch.log(s.float().clamp_min(1e-12))
        t_f = t.float()
        per_row = (t_f * (torch.log(t_f.clamp_min(1e-12)) - s_log)).sum(-1).mean(1)  # [batch, seq]
        losses.append(_masked_mean(per_row, mask))
    return torch.stack(losses).mean()


def qkv_relation_kl(student: Sequence[Tensor], teacher: Sequence[Tensor], heads: int,
                    mask: Tensor | None = None) -> Tensor:
    """MiniLMv2's self-attention relation distillation (Wang et al. 2021): for each of query, key and value, the
    scaled dot-product relation softmax(X_r X_r^T / sqrt(d_r)) within each of `heads` relation heads, matched by
    KL(teacher || student) per query row on real tokens, averaged over heads and the three relations. Relation
    heads split each side's own width, so teacher and student may differ in width and attention heads."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s_log, t_log = _relation_log_probs(s, heads, mask), _relation_log_probs(t, heads, mask)
        per_row = (t_log.exp() * (t_log - s_log)).sum(-1).mean(1)  # [batch, seq]
        losses.append(_masked_mean(per_row, mask))
    return torch.stack(losses).mean()


def _relation_log_probs(x: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    batch, seq, width = x.shape
    x = x.float().view(batch, seq, heads, width // heads).transpose(1, 2)  # [batch, heads, seq, d_r]
    scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:  # padding is no key: it gets no probability on either side
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def _masked_variance(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-dimension variance of [batch, seq, width] values over the real tokens."""
    flat = values.flatten(0, -2) if mask is None else values[mask.bool()]
    return flat.var(0, unbiased=False) if flat.shape[0] > 1 else torch.ones_like(flat[0])


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


# ---- registered losses -------------------------------------------------------------------------------------------


@register_loss("kd", needs=["logits", "teacher"])
def kd(x: LossInputs) -> Tensor:
    """Soft-label KL with temperature, ·T² (Hinton et al. 2015); for LMs only on target tokens."""
    return soft_kl(*_on_teacher_support(x), x.temperature, _token_mask(x))


def _on_teacher_support(x: LossInputs) -> tuple[Tensor, Tensor]:
    """(student, teacher) logits over the same outcomes: the whole vocabulary; or, from a top-K teacher cache,
    top_k_buckets, scaled by the temperature so that every loss's own softmax at it gives them back unchanged."""
    if x.teacher_token_ids is None:
        return x.student_logits, x.teacher_logits
    student, teacher = top_k_buckets(x.student_logits, x.teacher_logits, x.teacher_token_ids, x.temperature)
    return student * x.temperature, teacher * x.temperature


def top_k_buckets(student_logits: Tensor, teacher_log_probs: Tensor, token_ids: Tensor,
                  temperature: float) -> tuple[Tensor, Tensor]:
    """Both distributions at `temperature` over K + 1 outcomes: the teacher's K cached tokens, and all other
    tokens as one (the tail), as log-probabilities. The student's are its full-vocabulary probabilities, so the
    mass it puts outside the teacher's top K is its tail, which the teacher's tail mass bounds (renormalising
    the student over the K tokens alone would leave that mass unconstrained). The teacher's tail is exact at
    temperature 1 (1 - the cached probabilities); at another temperature it is taken as spread evenly over the
    other V - K tokens. With K = V there is no tail and this is the full distribution."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    vocab, k = student.shape[-1], token_ids.shape[-1]
    on_support = student.gather(-1, token_ids)
    teacher = teacher_log_probs.float() / temperature
    if k == vocab:
        return on_support, F.log_softmax(teacher, dim=-1)
    student_tail = torch.logsumexp(student.scatter(-1, token_ids, float("-inf")), dim=-1, keepdim=True)
    tail_mass = (1 - teacher_log_probs.float().exp().sum(-1, keepdim=True)).clamp_min(1e-30)
    others = vocab - k  # each holding tail_mass / others at temperature 1
    teacher_tail = math.log(others) + (tail_mass / others).log() / temperature
    return (torch.cat([on_support, student_tail], -1),
            F.log_softmax(torch.cat([teacher, teacher_tail], -1), dim=-1))


def _token_mask(x: LossInputs) -> Tensor | None:
    """Rows a logit loss averages over: every row of a classifier; the target tokens of a (masked or causal) LM."""
    return None if x.labels is None or x.student_logits.dim() == 2 else x.labels.ne(-100)


@register_loss("forward_kl", needs=["logits", "teacher"])
def forward_kl(x: LossInputs) -> Tensor:
    """KL(teacher || student) per token with temperature, ·T² (mean-seeking; kd by its sequence-model name)."""
    return soft_kl(*_on_teacher_support(x), x.temperature, _token_mask(x))


@register_loss("reverse_kl", needs=["logits", "teacher"])
def reverse_kl_loss(x: LossInputs) -> Tensor:
    """KL(student || teacher) per token with temperature, ·T² (mode-seeking, MiniLLM)."""
    return reverse_kl(*_on_teacher_support(x), x.temperature, _token_mask(x))


@register_loss("jsd", needs=["logits", "teacher"])
def jsd(x: LossInputs) -> Tensor:
    """Generalised JSD with jsd_beta (GKD): 0 forward KL, 1 reverse KL, between them a bounded mixture."""
    return generalised_jsd(*_on_teacher_support(x), x.beta, x.temperature, _token_mask(x))


@register_loss("tvd", needs=["logits", "teacher"])
def tvd(x: LossInputs) -> Tensor:
    """Total variation distance between teacher and student distributions per token, in [0, 1]."""
    return total_variation(*_on_teacher_support(x), x.temperature, _token_mask(x))


def target_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits against labels aligned with them (-100: not a target), over classes or tokens."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


@register_loss("ce", needs=["logits"])
def ce(x: LossInputs) -> Tensor:
    """Hard-label cross-entropy against the data's labels (for LMs: the target tokens)."""
    return target_cross_entropy(x.student_logits, x.labels)


@register_loss("hidden_mse", needs=["hidden", "teacher"])
def hidden_mse_loss(x: LossInputs) -> Tensor:
    """Hidden-state MSE through learned projections on the layer map, per dimension in units of the teacher's variance."""
    return hidden_mse_normalised(x.student_hidden, x.teacher_hidden, x.attention_mask)


@register_loss("hidden_mse_raw", needs=["hidden", "teacher"])
def hidden_mse_raw_loss(x: LossInputs) -> Tensor:
    """Hidden-state MSE through learned projections on the layer map, on the teacher's raw scale (TinyBERT as published)."""
    return hidden_mse(x.student_hidden, x.teacher_hidden, x.attention_mask)


@register_loss("hidden_cos", needs=["hidden", "teacher"])
def hidden_cos_loss(x: LossInputs) -> Tensor:
    """Hidden-state cosine distance through learned projections, on the layer map (DistilBERT)."""
    return hidden_cosine(x.student_hidden, x.teacher_hidden, x.attention_mask)


@register_loss("attention_kl", needs=["attentions", "teacher"])
def attention_kl_loss(x: LossInputs) -> Tensor:
    """KL between teacher and student attention distributions, on the layer map (MiniLM)."""
    return attention_kl(x.student_attentions, x.teacher_attentions, x.attention_mask)


@register_loss("qkv_relations", needs=["qkv", "teacher"])
def qkv_relations_loss(x: LossInputs) -> Tensor:
    """Query/key/value self-attention relations of the last student layer and its mapped teacher layer (MiniLMv2)."""
    return qkv_relation_kl(x.student_qkv, x.teacher_qkv, x.relation_heads, x.attention_mask)


@dataclass
class WeightedLoss:
    """A registry loss with its weight, optionally moving linearly from `weight` to `weight_end` over the first
    `until` of the run (all of it by default), then staying at `weight_end`."""

    loss: LossDef
    weight: float
    weight_end: float | None = None
    until: float = 1.0

    def weight_at(self, progress: float) -> float:
        if self.weight_end is None:
            return self.weight
        return self.weight + (self.weight_end - self.weight) * min(max(progress / self.until, 0.0), 1.0)
