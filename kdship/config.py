"""One typed config per command. Defaults < YAML recipe < flags, into the same pydantic model.

Unknown keys and out-of-range values are errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdship.errors import ConfigError

TOPK = re.compile(r"topk:([1-9][0-9]*)")
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]


class Strict(BaseModel):
    # inf/nan in a float setting (--temperature inf) would train to the end and fail writing the record
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


def resolvable(value: str | None) -> str | None:
    """A local data path made absolute (records and resumes then work from any folder); hub ids unchanged."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


class DataConfig(Strict):
    """Where the examples come from and which columns hold text and labels."""

    _absolute = field_validator("train", "eval")(lambda cls, v: resolvable(v))

    train: str | None = Field(None, description="train file (csv/tsv/jsonl/parquet/txt[.gz]/folder) or hub id")
    eval: str | None = Field(None, description="eval file or hub id (hub ids may end in :split)")
    text_columns: list[str] | None = Field(None, description="one column (single text) or two (sentence pairs)")
    label_column: str = "label"
    max_length: int = Field(128, ge=8, le=8192)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)

    @field_validator("text_columns")
    @classmethod
    def _one_or_two(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) not in (1, 2):
            raise ValueError("give one text column, or two for sentence pairs")
        return v


class LossSpec(Strict):
    """A named loss from the registry (`kdship list losses`), its weight and an optional linear weight schedule."""

    name: str
    weight: float = Field(1.0, ge=0)
    weight_end: float | None = Field(None, ge=0, description="weight reached at the last step (linear), or at `until`")
    until: float = Field(1.0, gt=0, le=1, description="fraction of the run at which weight_end is reached; the weight "
                                                      "stays there after it (0.5: the second half without this term)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from kdship.losses import LOSSES

        if v not in LOSSES:
            raise ValueError(f"unknown loss '{v}'; known losses: {', '.join(sorted(LOSSES))}")
        return v


class SelectionConfig(Strict):
    """Sample-value selection: a small trained model judges which samples are worth a step."""

    by: str = Field(description="the small scoring model (folder or hub id)")
    ratio: float = Field(0.5, gt=0, le=1, description="fraction of scored samples that get the step")
    mode: Literal["topk", "weighted"] = Field(
        "topk", description="topk: the highest values; weighted: sampled with probability softmax(value)")
    refresh: int = Field(1, ge=1, description="reuse a sample's score by the trained model for K steps (across "
                                              "epochs); 1 scores every candidate afresh")


class ReverseConfig(Strict):
    """Reverse distillation: a small trained model teaches the trained model early on, with a decaying weight."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False, populate_by_name=True,
                              serialize_by_alias=True)

    from_: str = Field(alias="from", description="the small trained model (folder or hub id)")
    steps: int = Field(ge=1, description="steps over which its weight decays to 0")
    schedule: Literal["linear", "cosine", "step"] = "linear"
    temperature: float = Field(2.0, gt=0)
    start: float = Field(1.0, gt=0, le=1, description="weight of the small model's KD at step 0")
    hidden_weight: float = Field(0.0, ge=0, description="weight of hidden-state matching (MSE through learned "
                                                        "projections, large -> small width) beside the KD term")


class EmaConfig(Strict):
    """Teacher-free: an exponential moving average of the trained model's weights teaches it (mean teacher)."""

    decay: float = Field(0.999, gt=0, lt=1, description="ema = decay·ema + (1 - decay)·weights, once per step")
    weight: float = Field(1.0, gt=0, description="weight of T²·KL(p_ema || p_model) beside the step's loss")
    temperature: float = Field(1.0, gt=0)
    start: float = Field(0.1, ge=0, lt=1, description="fraction of the run before the average teaches (an average "
                                                      "of a model that has not learned yet teaches nothing)")


class VirtualTeacherConfig(Strict):
    """Teacher-free: a hand-made teacher distribution (Tf-KD's virtual teacher), at a high temperature."""

    correct_prob: float = Field(0.9, gt=0, lt=1, description="the virtual teacher's probability of the label")
    temperature: float = Field(20.0, gt=0, description="Tf-KD softens the virtual distribution strongly (20)")
    alpha: float = Field(0.5, gt=0, le=1, description="loss = (1 - alpha)·step loss + alpha·T²·KL(virtual || model)")


class EarlyExitConfig(Strict):
    """Layer-wise self-distillation: exit classifiers on chosen layers, taught by the final classifier."""

    layers: list[int] = Field(default_factory=list, description="student layers (1-based) with an exit; empty: "
                                                               "every layer below the last")
    weight: float = Field(1.0, gt=0, description="weight of the mean exit loss beside the step's loss")
    alpha: float = Field(0.5, ge=0, le=1, description="share of the final classifier's soft predictions in each "
                                                      "exit's loss (the rest: the labels)")
    temperature: float = Field(2.0, gt=0)


class CurriculumConfig(Strict):
    """Easy to hard: examples ordered or weighted by a trained model's confidence or loss, with pacing."""

    difficulty: Literal["confidence", "loss"] = Field(
        "confidence", description="confidence: 1 - the scorer's top probability; loss: its cross-entropy on the label")
    by: str = Field("teacher", description="the scorer: the teacher (distill), or a trained classifier's folder")
    mode: Literal["order", "weighted"] = Field(
        "order", description="order: batches from the easiest c(t) of the data; weighted: all data, easy ones likelier")
    pacing: Literal["linear", "root", "step"] = "linear"
    start: float = Field(0.25, gt=0, le=1, description="competence at step 0: the easiest fraction available")
    full_at: float = Field(0.5, gt=0, le=1, description="fraction of the run from which all data is available")


class PeersConfig(Strict):
    """Online distillation between the students of one run (with or without a fixed teacher)."""

    mode: Literal["mutual", "ensemble"] = Field(
        "mutual", description="mutual: each learns the others (deep mutual learning); ensemble: their average "
                              "teaches each")
    weight: float = Field(1.0, gt=0, description="weight of each student's T²·KL term beside the step's loss")
    temperature: float = Field(1.0, gt=0)


class CrossTaskConfig(Strict):
    """A teacher of a related task with other labels: features transfer as they are, logits through a map."""

    labels: Literal["data"] = Field("data", description="the student predicts the data's labels (the teacher's "
                                                        "differ)")
    map_steps: int = Field(300, ge=1, le=100_000, description="Adam steps fitting the linear map from the teacher's "
                                                              "logits to the data's labels")


# Flat spellings of nested technique settings (recipes written before the nesting, and the CLI flags' names).
class SamplingConfig(Strict):
    """How a causal LM's continuations are drawn (kdship generate; on-policy distillation)."""

    max_new_tokens: int = Field(128, ge=1, le=8192, description="tokens generated after each prompt at most (the "
                                                                 "end-of-text token ends one earlier)")
    do_sample: bool = Field(True, description="sample (with temperature, top_p, top_k); off: greedy")
    temperature: float = Field(1.0, gt=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this "
                                                      "probability (1: all)")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0: all)")


class OnPolicyConfig(SamplingConfig):
    """On-policy distillation (GKD): a share of the batches is the student's own continuations of the prompts,
    scored by the teacher token by token."""

    ratio: float = Field(gt=0, le=1, description="the share of batches (lambda) replaced by the student's samples")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="tokens sampled after each prompt at most (and "
                                                                "within max_length)")


FLAT_SPELLINGS = {"select_by": ("selection", "by"), "select_ratio": ("selection", "ratio"),
                  "select_mode": ("selection", "mode"), "select_refresh": ("selection", "refresh"),
                  "reverse_from": ("reverse", "from"), "reverse_steps": ("reverse", "steps"),
                  "reverse_schedule": ("reverse", "schedule"), "reverse_temperature": ("reverse", "temperature"),
                  "reverse_start": ("reverse", "start"), "reverse_hidden": ("reverse", "hidden_weight"),
                  "ema_decay": ("ema", "decay"), "ema_weight": ("ema", "weight"),
                  "virtual_correct_prob": ("virtual_teacher", "correct_prob"),
                  "virtual_temperature": ("virtual_teacher", "temperature"),
                  "virtual_alpha": ("virtual_teacher", "alpha"),
                  "exits": ("early_exit", "layers"), "exit_weight": ("early_exit", "weight"),
                  "curriculum_difficulty": ("curriculum", "difficulty"), "curriculum_by": ("curriculum", "by"),
                  "curriculum_mode": ("curriculum", "mode"), "pacing": ("curriculum", "pacing"),
                  "curriculum_start": ("curriculum", "start"), "curriculum_full_at": ("curriculum", "full_at"),
                  "peers_mode": ("peers", "mode"), "peers_weight": ("peers", "weight"),
                  "cross_task_map_steps": ("cross_task", "map_steps"),
                  "on_policy_ratio": ("on_policy", "ratio"),
                  "on_policy_max_new_tokens": ("on_policy", "max_new_tokens"),
                  "on_policy_temperature": ("on_policy", "temperature")}


def nest_flat_spellings(values: Any) -> Any:
    """select_by: X -> selection: {by: X} (and the other flat spellings): old recipes keep loading."""
    if not isinstance(values, dict) or not FLAT_SPELLINGS.keys() & values.keys():
        return values
    values = dict(values)
    for flat, (group, key) in FLAT_SPELLINGS.items():
        if flat not in values:
            continue
        value = values.pop(flat)
        section = values.get(group) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{group} must be a mapping of its settings, e.g. {group}: {{{key}: ...}}")
        if value is not None and key in section and section[key] != value:
            raise ValueError(f"{flat} and {group}.{key} are both set, to different values; keep {group}.{key}")
        if value is not None:
            values[group] = {**section, key: value}
    return values


class RunConfig(Strict):
    """What every training run shares: output, data, optimisation, loop, checkpoints."""

    output: str | None = None
    data: DataConfig = DataConfig()
    objective: Literal["classify", "mlm", "clm", "features", "match"] = Field(
        "classify", description="classify: labelled task data; mlm: masked-LM on text; clm: a causal LM (decoder) on "
                                "text, prompt/response or chat data; features: hidden/attention matching only, on "
                                "any text (distill); match: a dual-tower (bi-encoder) model on sentence pairs")
    match_loss: Literal["in_batch", "classify"] = Field(
        "in_batch", description="objective match: in_batch (each pair's partner against the batch's other "
                                "partners, no labels) or classify (labelled pairs, from u, v and |u-v|)")
    epochs: float = Field(3.0, gt=0, le=1e6)
    max_steps: int | None = Field(None, ge=1, le=10**9, description="stop after this many optimizer steps")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers (Accelerate's): losses, learning rate, evaluations")
    logging_dir: str | None = Field(None, description="where trackers write; default <output>-logs beside it")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0, le=1.0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    eval_every: int | None = Field(None, ge=1, description="evaluate every N steps (default: once per epoch)")
    save_every: int = Field(100, ge=1, description="write a resumable checkpoint every N steps")
    seed: int = 42
    device: Device = "auto"
    precision: Precision = "auto"
    overwrite: bool = False
    resume: bool = False
    allow_pickle_weights: bool = Field(False, description="load pytorch_model.bin (pickle, which can run code) "
                                                          "from a folder without safetensors")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp (a full copy of each trained model per device, gradients "
                           "averaged) or fsdp (its weights, gradients and optimizer state sharded across devices)")
    selection: SelectionConfig | None = Field(None, description="sample-value selection (technique)")
    ema: EmaConfig | None = Field(None, description="mean teacher: an EMA of the model's weights teaches it "
                                                    "(technique)")
    virtual_teacher: VirtualTeacherConfig | None = Field(None, description="Tf-KD virtual teacher (technique)")
    early_exit: EarlyExitConfig | None = Field(None, description="exit classifiers on chosen layers (technique)")
    curriculum: CurriculumConfig | None = Field(None, description="easy-to-hard ordering of the data (technique)")

    @property
    def labelled(self) -> bool:
        """Whether the data's labels are read (classification, or pair classification). Then an example's outputs
        depend on it alone, with no random masking or batch neighbours, so they can be computed once and cached."""
        return self.objective == "classify" or (self.objective == "match" and self.match_loss == "classify")

    @property
    def train_labelled(self) -> bool:
        """Whether the training examples' labels are read (the eval data's are, whenever `labelled`)."""
        return self.labelled

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, values: Any) -> Any:
        return nest_flat_spellings(values)

    @model_validator(mode="after")
    def _consistent_run(self) -> "RunConfig":
        if "match_loss" in self.model_fields_set and self.objective != "match":
            raise ValueError("match_loss applies to objective match only; drop it or set objective: match")
        if self.selection and self.objective == "features":
            raise ValueError("sample-value selection scores samples by their task loss, which objective features "
                             "does not have; use classify, mlm or match")
        needs_classes = {"virtual_teacher": self.virtual_teacher, "early_exit": self.early_exit,
                         "curriculum": self.curriculum}
        wrong = next((name for name, on in needs_classes.items() if on and self.objective != "classify"), None)
        if wrong:
            raise ValueError(f"{wrong} works on a classifier's labelled data; objective {self.objective} has no "
                             "labels to classify (use objective classify)")
        if self.selection and self.selection.refresh > 1 and self.objective == "match" and not self.labelled:
            # an in-batch loss depends on the whole batch: a score kept from another batch is not comparable
            raise ValueError("selection.refresh > 1 cannot be used with in-batch matching (a pair's loss depends "
                             "on its batch); use refresh 1")
        return self


class TrainConfig(RunConfig):
    """`kdship train`: fine-tune or MLM-pretrain one model (how teachers are made)."""

    model: str | None = Field(None, description="local save_pretrained dir or hub id")
    init: str | None = Field(None, description="shape spec, e.g. bert:layers=12,hidden=768,heads=12,ffn=3072")
    tokenizer: str | None = Field(None, description="tokenizer dir/hub id; default: the model's, or trained on the data")
    vocab_size: int = Field(8000, ge=100, description="size of a tokenizer trained on the data (with --init)")
    reverse: ReverseConfig | None = Field(None, description="reverse distillation (technique)")

    @model_validator(mode="after")
    def _one_source(self) -> "TrainConfig":
        if (self.model is None) == (self.init is None):
            raise ValueError("give exactly one of model (a path or hub id) or init (a shape spec)")
        return self


def named_students(v: Any) -> Any:
    """Students as name -> source: a list (4L312, specs, paths) is named after its entries; either way the names
    become folder names, so they are made folder-safe."""
    if not isinstance(v, (list, dict)):
        return v
    pairs = list(v.items()) if isinstance(v, dict) else [(s, s) for s in v]
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(n)).strip("_.") or f"student{i}" for i, (n, _) in enumerate(pairs)]
    if len(set(names)) != len(names):
        raise ValueError(f"students must differ, got {v}")
    return dict(zip(names, (source for _, source in pairs)))


TEACHER_FREE = ("ema", "virtual_teacher", "peers", "early_exit")  # techniques that teach without a teacher


def _default_losses() -> list[LossSpec]:
    return [LossSpec(name="kd", weight=0.5), LossSpec(name="ce", weight=0.5)]


# techniques that score, order, probe or target training examples by their labels
LABEL_READING_TECHNIQUES = ("selection", "virtual_teacher", "early_exit", "curriculum", "cross_task")


class DistillConfig(RunConfig):
    """`kdship distill`: a student (or several, sharing one teacher forward per batch) learns from a teacher."""

    teacher: str | None = None
    teachers: list[str] | None = Field(None, description="several teachers (same labels and tokenizer): their "
                                                         "predictions combined by teacher_weighting")
    teacher_weighting: Literal["mean", "weights", "confidence"] = Field(
        "mean", description="several teachers: mean of their softened predictions, teacher_weights, or per example "
                            "by each teacher's confidence (its top probability)")
    teacher_weights: list[float] | None = Field(None, description="teacher_weighting weights: one weight per teacher")
    tokenizer: str | None = Field(None, description="without a teacher: the tokenizer of spec students (default: "
                                                    "the first student folder's)")
    student: str | None = Field(None, description="path, hub id, or shape spec (bert:layers=4,hidden=312,...)")
    students: dict[str, str] | None = Field(
        None, description="several students trained in one pass: a list (4L312, 6L768, specs, paths) or name: source")
    teacher_cache: str = Field(
        "auto", description="auto: the teacher's logits computed once when the losses need nothing else "
                            "(classifiers); off; topk:K (objective clm): the teacher's top-K next-token "
                            "log-probabilities written once into the run folder, then the teacher is unloaded; or "
                            "the folder of a cache made by kdship cache-teacher (the teacher is not loaded)")
    teacher_sharding: Literal["replicate", "fsdp"] = Field(
        "replicate", description="with several processes: a full teacher per device, or its weights sharded "
                                 "across devices with FSDP (a teacher that does not fit one device)")
    losses: list[LossSpec] = Field(default_factory=_default_losses)
    temperature: float = Field(2.0, gt=0)
    jsd_beta: float = Field(0.5, ge=0, le=1, description="loss jsd: the teacher's share of the mixture (GKD); 0 is "
                                                         "forward KL, 1 reverse KL")
    layer_map: list[int] | None = Field(
        None, description="teacher hidden-state index for each student hidden state (0 = embeddings); default uniform"
    )
    init_from_teacher: bool = Field(True, description="copy every k-th teacher layer into a same-width spec student")
    lr: float | None = Field(
        None, gt=0, le=1.0, description="peak learning rate; default per student by how its weights began: 1e-4 "
        "pretrained (copied from the teacher or loaded), 5e-4 random init, also in the later stages and runs of a "
        "student kdship trained from random init (measured: README, issue 12)")
    train_layers: list[int] | None = Field(
        None, description="train only these student layers (1-based; 0: the embeddings), the rest frozen; feature "
                          "losses read these layers only (stage-wise progressive distillation)")
    generations: int = Field(1, ge=1, le=20, description="born-again: each generation a fresh student taught by the "
                                                         "previous one (the first by the teacher)")
    peers: PeersConfig | None = Field(None, description="online distillation between the students (technique)")
    cross_task: CrossTaskConfig | None = Field(None, description="a teacher of a related task with other labels "
                                                                 "(technique)")
    on_policy: OnPolicyConfig | None = Field(None, description="causal LMs: batches of the student's own samples, "
                                                               "scored by the teacher (technique)")

    _named = field_validator("students", mode="before")(lambda cls, v: named_students(v))

    @field_validator("teacher_cache")
    @classmethod
    def _cache_spelling(cls, v: str) -> str:
        if v.startswith("topk") and not TOPK.fullmatch(v):
            raise ValueError(f"{v!r}: write topk:K with K a whole number of tokens >= 1, e.g. topk:64")
        if not v.strip():
            raise ValueError("teacher_cache is empty; give auto, off, topk:K or a cache folder")
        return v

    @property
    def topk_cache(self) -> int | None:
        """K of `teacher_cache: topk:K` (a cache built in the run folder)."""
        match = TOPK.fullmatch(self.teacher_cache)
        return int(match.group(1)) if match else None

    @property
    def teacher_cache_folder(self) -> str | None:
        """A top-K cache folder made earlier (kdship cache-teacher)."""
        return None if self.teacher_cache in ("auto", "off") or self.topk_cache else self.teacher_cache

    @model_validator(mode="before")
    @classmethod
    def _teacher_free_losses(cls, values: Any) -> Any:
        """A teacher-free technique without a teacher: the default losses are the labels' alone (kd would have
        nothing to read); on-policy distillation: jsd alone (the labels of sampled batches are the samples)."""
        if isinstance(values, dict) and not values.get("teacher") and not values.get("teachers") \
                and "losses" not in values and any(values.get(k) is not None for k in TEACHER_FREE):
            return {**values, "losses": [{"name": "ce", "weight": 1.0}]}
        if isinstance(values, dict) and "losses" not in values and (values.get("on_policy") or
                                                                    values.get("on_policy_ratio") is not None):
            return {**values, "losses": [{"name": "jsd", "weight": 1.0}]}  # GKD: the divergence alone
        return values

    @property
    def train_labelled(self) -> bool:
        """A classifier whose losses all read the teacher, with no technique that reads labels, learns from a
        transfer set (Hinton et al. 2015): its training text needs no labels, so unlabeled in-domain text (plain
        .txt, a folder of them, or a table without a label column) can be distilled on; eval data keeps its labels."""
        from kdship.losses import LOSSES

        if self.objective != "classify":
            return self.labelled
        own = [s.name for s in self.losses if "teacher" not in LOSSES[s.name].needs]  # ce: the data's labels
        label_reading = any(getattr(self, name) is not None for name in LABEL_READING_TECHNIQUES)
        return bool(own) or label_reading or self.generations > 1

    @property
    def teacher_sources(self) -> list[str]:
        return list(self.teachers or ([self.teacher] if self.teacher else []))

    @model_validator(mode="after")
    def _consistent(self) -> "DistillConfig":
        from kdship.losses import LOSSES

        if not self.losses:
            raise ValueError("losses is empty; give at least one (kdship list losses)")
        if self.teacher and self.teachers:
            raise ValueError("give teacher or teachers, not both")
        self._check_teachers()
        if self.train_layers is not None and (not self.train_layers or min(self.train_layers) < 0):
            raise ValueError(f"train_layers {self.train_layers}: give student layers 1..N (0: the embeddings)")
        if self.generations > 1 and (self.teachers or self.students):
            raise ValueError("generations (born-again) distils one student from one teacher, then from each "
                             "generation; give teacher and student (not teachers or students)")
        if self.peers and len(self.students or {}) < 2:
            raise ValueError("peers trains students together: give two or more with --students A,B")
        if self.cross_task and (self.teachers or self.objective != "classify"):
            raise ValueError("cross_task lets one teacher of another task teach a classifier: give one teacher and "
                             "objective classify")
        if self.student and self.students:
            raise ValueError("give student or students, not both")
        if self.students is not None and len(self.students) < 1:
            raise ValueError("students is empty")
        if self.selection and self.students:
            raise ValueError("sample-value selection scores samples for one trained model; with several students, "
                             "distill them without selection (or one at a time)")
        own = [s.name for s in self.losses if "teacher" not in LOSSES[s.name].needs]
        if self.on_policy and own:
            raise ValueError(f"on_policy: {', '.join(own)} would train the student on its own samples (their targets "
                             "are what it sampled); give the teacher-reading losses only, e.g. --loss jsd")
        if self.on_policy and (self.objective != "clm" or self.topk_cache or self.teacher_cache_folder):
            raise ValueError("on_policy samples a causal LM's continuations and the teacher scores them live: use "
                             "objective clm without a top-K teacher cache (it holds only the data's tokens)")
        if (self.topk_cache or self.teacher_cache_folder) and self.objective != "clm":
            raise ValueError(f"teacher_cache {self.teacher_cache}: a top-K cache holds a causal LM's next-token "
                             "distributions (objective clm); a classifier's logits are cached with auto")
        if (self.topk_cache or self.teacher_cache_folder) and not any("teacher" in LOSSES[s.name].needs
                                                                      for s in self.losses):
            raise ValueError(f"teacher_cache {self.teacher_cache}: no loss reads the teacher; add one (forward_kl, "
                             "reverse_kl, jsd, tvd) or drop the cache")
        if self.topk_cache or self.teacher_cache_folder:
            live = [s.name for s in self.losses if LOSSES[s.name].needs - {"logits", "teacher"}]
            if live:
                raise ValueError(f"{', '.join(live)} read the teacher's layers, which a top-K cache does not hold; "
                                 "use logit losses (forward_kl, reverse_kl, jsd, tvd, ce) or teacher_cache off")
        if self.objective == "features":
            logit_losses = [s.name for s in self.losses if "logits" in LOSSES[s.name].needs]
            if logit_losses:
                raise ValueError(f"objective features matches hidden states and attentions only; drop {logit_losses}")
        return self


    def _check_teachers(self) -> None:
        if not self.teachers:
            return
        if len(self.teachers) < 2 or len(set(self.teachers)) != len(self.teachers):
            raise ValueError(f"teachers {self.teachers}: give two or more different teachers (one: use teacher)")
        from kdship.losses import LOSSES

        features = [s.name for s in self.losses if LOSSES[s.name].needs & {"hidden", "attentions", "qkv"}]
        if features:
            raise ValueError(f"{', '.join(features)} match one teacher's layers; with several teachers use kd and ce "
                             "(or distil features from one teacher in a pipeline stage)")
        if (self.teacher_weighting == "weights") != (self.teacher_weights is not None):
            raise ValueError("teacher_weights go with teacher_weighting: weights (and it needs them)")
        if self.teacher_weights is not None and (len(self.teacher_weights) != len(self.teachers)
                                                 or min(self.teacher_weights) < 0 or sum(self.teacher_weights) <= 0):
            raise ValueError(f"teacher_weights {self.teacher_weights}: one non-negative weight per teacher "
                             f"({len(self.teachers)}), not all zero")


class ModelJob(Strict):
    """What a command that loads models and writes one output shares: where it runs, whether it may replace the
    output, and whether pickle weights may load."""

    device: Device = "auto"
    overwrite: bool = False
    allow_pickle_weights: bool = Field(False, description="load pytorch_model.bin (pickle, which can run code) "
                                                          "from a folder without safetensors")


class AugmentConfig(ModelJob):
    """`kdship augment`: TinyBERT-style data augmentation, labelled by the teacher."""

    model: str = Field(description="the masked-LM that proposes words (method embedding: any encoder, whose input "
                                   "embeddings give the neighbours)")
    teacher: str = Field(description="the classifier that labels every sentence (the teacher you will distil from)")
    data: DataConfig = DataConfig()
    output: str = Field(description="the .tsv to write (its settings go beside it, in <file>.kdship.json)")
    copies: int = Field(10, ge=1, le=100, description="augmented copies tried per sentence (TinyBERT: 20)")
    replace_prob: float = Field(0.4, gt=0, le=1, description="probability of replacing each word (TinyBERT: 0.4)")
    top_k: int = Field(15, ge=1, le=200, description="candidates per word (TinyBERT: 15)")
    method: Literal["mlm", "embedding"] = Field(
        "mlm", description="mlm: masked-LM predictions for one-piece words, embedding neighbours for the rest; "
                           "embedding: neighbours for every word")
    keep_original: bool = Field(True, description="write the original sentences too")
    batch_size: int = Field(128, ge=1, description="sentences per batch when the teacher labels them")
    seed: int = 42


class GenerateConfig(ModelJob):
    """`kdship generate`: a causal LM's continuations of prompts, as prompt/response JSONL (a sequence-level KD
    transfer set: distil on it with objective clm), the settings recorded beside the file."""

    model: str = Field(description="the causal LM that writes the responses (the teacher, for sequence-level KD)")
    prompts: str = Field(description="prompts: a text file (one per line), or JSONL/CSV/parquet with a prompt "
                                     "column (responses there are ignored) or chat messages")
    output: str = Field(description="the .jsonl to write (its settings go beside it, in <file>.kdship.json)")
    sampling: SamplingConfig = SamplingConfig()
    samples_per_prompt: int = Field(1, ge=1, le=100, description="continuations drawn per prompt")
    max_prompts: int | None = Field(None, ge=1, description="use the first N prompts")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    seed: int = 42

    _absolute = field_validator("prompts")(lambda cls, v: resolvable(v))


class CacheTeacherConfig(ModelJob):
    """`kdship cache-teacher`: a causal-LM teacher's top-K next-token log-probabilities on the training data,
    written once for distillations that then train without loading it (`kdship distill --teacher-cache DIR`)."""

    teacher: str = Field(description="the causal-LM teacher (folder or hub id)")
    data: DataConfig = DataConfig()
    top_k: int = Field(description="tokens kept per position (the teacher's most likely; at most its vocabulary)",
                       ge=1)
    output: str = Field(description="the cache folder to write")
    batch_size: int = Field(32, ge=1, description="sequences per teacher forward pass")
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _train_data_only(self) -> "CacheTeacherConfig":
        if not self.data.train:
            raise ValueError("no data; pass --data FILE (the distillation's training data)")
        if self.data.eval:
            raise ValueError("the cache holds the training data's tokens; drop data.eval (distill evaluates live)")
        return self


class EvalConfig(Strict):
    """`kdship eval`: teacher and student on the same split, in one run."""

    teacher: str | None = None
    student: str
    objective: Literal["auto", "classify", "match", "clm"] = Field(
        "auto", description="what the models are (classifier, bi-encoder, causal LM): read from them; given, checked")
    data: DataConfig = DataConfig()
    batch_size: int = Field(128, ge=1)
    prompts: str | None = Field(None, description="causal LMs: a text file of prompts (one per line) to generate "
                                                  "from greedily, side by side; default: the eval data's prompts")
    generations: int = Field(4, ge=0, le=100, description="causal LMs: how many prompts to generate from")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="causal LMs: tokens generated per prompt")
    ece_bins: int = Field(15, ge=2, le=100)
    exit_thresholds: list[float] | None = Field(None, description="models with early exits: the thresholds of the "
                                                                  "accuracy curve (default: a range per criterion)")
    exit_criterion: Literal["confidence", "entropy"] = "confidence"
    output: str | None = Field(None, description="JSON path; default STUDENT/eval.json")
    device: Device = "auto"
    allow_pickle_weights: bool = Field(False, description="load pytorch_model.bin (pickle, which can run code) "
                                                          "from a folder without safetensors")


C = TypeVar("C", bound=BaseModel)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def drop_unset(d: dict[str, Any]) -> dict[str, Any]:
    """Flags left unset (None, or a group of them) do not override the recipe."""
    kept = {k: (drop_unset(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}
    return {k: v for k, v in kept.items() if v != {}}


def shipped_recipes() -> dict[str, Path]:
    """The recipes installed with kdship (the repository's pipelines/), by name."""
    from importlib.resources import files

    return {Path(f.name).stem: Path(str(f)) for f in files("kdship.recipes").iterdir() if f.name.endswith(".yaml")}


def resolve_recipe(path: str | Path, what: str = "recipe") -> Path:
    """A recipe file, or the name of a shipped one (`task_kd` or `task_kd.yaml`) when no such file exists here."""
    given = Path(path)
    if given.is_file():
        return given
    if given.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give the YAML file")
    shipped = shipped_recipes()
    if what == "recipe" and given.parent == Path(".") and given.stem in shipped:
        return shipped[given.stem]
    hint = f"shipped recipes, by name: {', '.join(sorted(shipped))}" if what == "recipe" else "give the YAML file"
    raise ConfigError(f"{what} {path} not found; check the path ({hint})")


def read_recipe(path: str | Path, what: str = "recipe") -> dict[str, Any]:
    path = resolve_recipe(path, what)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of config keys, got {type(data).__name__}")
    return data


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{field}'{_valid_keys_hint(model, error['loc'])}"
    if error["type"] == "missing" and len(error["loc"]) > 1:  # a section given without one of its required keys
        section = ".".join(str(p) for p in error["loc"][:-1])
        flag = next((f" (--{flat.replace('_', '-')})" for flat, where in FLAT_SPELLINGS.items()
                     if where == tuple(map(str, error["loc"]))), "")
        return (f"{field}{flag} is required once any {section} setting is given: "
                f"{_description(model, error['loc'])}")
    msg = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) or error["type"] == "missing" else f" (got {got!r})"
    return f"{field}: {msg}{shown}"


def _description(model: type[BaseModel], loc: tuple) -> str:
    """The description of the field at `loc` (a path through nested configs), or its name."""
    info = None
    for part in loc:
        info = model.model_fields.get(str(part)) or next(
            (f for f in model.model_fields.values() if f.alias == str(part)), None)
        inner = getattr(info, "annotation", None)
        inner = next((a for a in getattr(inner, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)),
                     inner)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
    return (info.description if info and info.description else str(loc[-1]))


def _valid_keys_hint(model: type[BaseModel], loc: tuple) -> str:
    for part in loc[:-1]:
        annotation = model.model_fields.get(str(part))
        inner = getattr(annotation, "annotation", None) if annotation else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return ""
        model = inner
    return f"; valid keys: {', '.join(model.model_fields)}"


def build_config(cls: type[C], recipe: str | Path | None = None, what: str = "recipe", **flags: Any) -> C:
    """Defaults < recipe < flags (flags left as None do not override); `what` names the file in errors."""
    try:
        recipe_values = nest_flat_spellings(read_recipe(recipe, what) if recipe else {})
    except ValueError as e:
        raise ConfigError(f"invalid {cls.__name__} in {recipe}: {e}") from None
    merged = deep_merge(recipe_values, drop_unset(flags))
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        problems = "; ".join(_describe(err, cls) for err in e.errors())
        source = f" in {recipe}" if recipe else ""
        raise ConfigError(f"invalid {cls.__name__}{source}: {problems}") from None


def to_record(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


class QuickstartConfig(Strict):
    """`kdship quickstart`: the built-in offline run."""

    output: str = "kdship-quickstart"
    seed: int = 0
    train_size: int = Field(4000, ge=100)
    eval_size: int = Field(800, ge=50)
    device: Device = "auto"
    overwrite: bool = False


class ExportConfig(Strict):
    """`kdship export`: validated ONNX and ONNX Runtime variants in one self-describing artifact folder."""

    student: str
    to: list[str] = Field(default_factory=lambda: ["onnx"], min_length=1)
    output: str | None = None
    opset: int = Field(18, ge=18, le=23, description="the dynamo exporter takes 18 to 23")
    eval_data: str | None = Field(None, description="parity/accuracy data; default: the student's eval data")
    eval_samples: int = Field(512, ge=8, description="eval rows used for agreement and accuracy per variant")
    calib_data: str | None = Field(None, description="int8-static calibration data; default: the student's train data")
    calib_samples: int = Field(128, ge=8)
    _absolute = field_validator("eval_data", "calib_data")(lambda cls, v: resolvable(v))
    text_columns: list[str] | None = None
    label_column: str = "label"
    max_length: int | None = Field(None, ge=8, description="default: the student's training max_length")
    max_accuracy_drop: float = Field(0.02, ge=0, le=1, description="largest accuracy loss a variant may have")
    allow_mismatch: bool = Field(False, description="write the artifact even if a parity check fails (recorded)")
    trt_opt_batch: int = Field(8, ge=1, description="TensorRT profile: the batch size to optimise for")
    trt_max_batch: int = Field(256, ge=1)
    trt_opt_seq: int = Field(128, ge=1)
    trt_max_seq: int = Field(512, ge=1)
    allow_pickle_weights: bool = Field(False, description="load pytorch_model.bin (pickle, which can run code) "
                                                          "from a folder without safetensors")
    overwrite: bool = False

    @model_validator(mode="after")
    def _profile_in_order(self) -> "ExportConfig":
        if self.trt_opt_batch > self.trt_max_batch or self.trt_opt_seq > self.trt_max_seq:
            raise ValueError(f"the TensorRT profile's opt shape {self.trt_opt_batch}x{self.trt_opt_seq} exceeds its "
                             f"max {self.trt_max_batch}x{self.trt_max_seq}; raise --trt-max or lower --trt-opt")
        return self

    @field_validator("to")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        from kdship.exporters import load_all

        names = [t.strip() for item in v for t in item.split(",") if t.strip()]
        if not names:
            raise ValueError("no export target given; pass e.g. --to onnx (kdship list exporters)")
        unknown = [t for t in names if t not in load_all()]
        if unknown:
            raise ValueError(f"unknown export target {unknown[0]!r}; valid targets: {', '.join(load_all())}")
        return names


class ServeConfig(Strict):
    """`kdship serve`: an HTTP server for an exported classifier."""

    artifact: str
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port")
    backend: str = "ort-cpu"
    variant: str | None = Field(None, description="exported variant to serve (default: the backend's preferred)")
    threads: int | None = Field(None, ge=1)
    batching: bool = Field(True, description="server-side dynamic batching")
    max_batch: int = Field(32, ge=1, description="most texts in one model call")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="how long a request may wait for others to join")
    max_texts: int = Field(64, ge=1, description="most texts in one request")
    max_text_chars: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    exit_threshold: float | None = Field(None, description="a model with early exits (backend torch): each text "
                                                           "stops at its first exit this sure")
    exit_criterion: Literal["confidence", "entropy"] = "confidence"
    allow_pickle_weights: bool = Field(False, description="load pytorch_model.bin (pickle, which can run code) "
                                                          "from a folder without safetensors")
    verify: bool = Field(True, description="check the artifact's files against the sha256 in its manifest")

    @model_validator(mode="after")
    def _exits_on_torch(self) -> "ServeConfig":
        if self.exit_threshold is not None and self.backend != "torch":
            raise ValueError("--exit-threshold needs --backend torch: the exported graphs compute every layer (they "
                             "return every exit's logits), so stopping early saves no time there")
        return self


class TritonConfig(Strict):
    """`kdship deploy triton`: a Triton Inference Server model repository for an artifact."""

    artifact: str
    output: str | None = None
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="default: the artifact folder's name")
    variant: str | None = Field(None, description="default: onnx for auto, tensorrt/fp16/ort-opt/onnx on gpu, "
                                                  "ort-opt/onnx on cpu")
    kind: Literal["auto", "gpu", "cpu"] = Field("auto", description="Triton instance kind: auto loads on a GPU "
                                                "server and on a CPU-only one")
    max_batch: int = Field(64, ge=1, le=2**31 - 1, description="Triton's max_batch_size (an int32)")
    instances: int = Field(1, ge=1, le=1024)
    queue_delay_us: int = Field(100, ge=0, le=10**9)
    max_length: int | None = Field(None, ge=8, description="tokenizer pads to this; default: the artifact's")
    verify: bool = Field(True, description="check the artifact's files against the sha256 in its manifest")
    overwrite: bool = False


class BenchConfig(Strict):
    """`kdship bench`: latency and throughput of one or several models, side by side, per backend and shape."""

    models: list[str] = Field(min_length=1, description="artifact or model folders; the first is the baseline")
    backends: list[str] = Field(default_factory=lambda: ["ort-cpu"])
    batch: list[int] = Field(default_factory=lambda: [1, 8, 64])
    seq: list[int] = Field(default_factory=lambda: [32, 128])
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all)")
    cpus: list[int] | None = Field(None, description="pin the benchmark to these CPU cores (default: as started)")
    warmup_s: float = Field(1.0, ge=0)
    min_runs: int = Field(20, ge=3, description="timed calls per model in each interleaved round")
    min_rounds: int = Field(6, ge=3, description="interleaved rounds at least (A B, B A, ...)")
    max_seconds: float = Field(10.0, gt=0, description="time bound per measured point (all models together), once "
                                                       "min_rounds are done")
    settle: float = Field(0.03, gt=0, le=1, description="stop once every speedup's 95% interval is within "
                                                        "±settle of it")
    inputs: Literal["auto", "real", "random"] = Field(
        "auto", description="real eval texts (auto: when the model's record names them, else random ids)")
    exit_thresholds: list[float] | None = Field(
        None, description="models with early exits, backend torch: also measure each at these exit thresholds "
                          "(rows MODEL@exitT), with the accuracy at each on the model's eval data")
    exit_criterion: Literal["confidence", "entropy"] = "confidence"
    allow_pickle_weights: bool = Field(False, description="load pytorch_model.bin (pickle, which can run code) "
                                                          "from a folder without safetensors")
    verify: bool = Field(True, description="check the artifact's files against the sha256 in its manifest")
    output: str | None = None
    overwrite: bool = False

    @model_validator(mode="after")
    def _exits_on_torch(self) -> "BenchConfig":
        if self.exit_thresholds is not None and set(self.backends) != {"torch"}:
            raise ValueError("exit thresholds need --backend torch alone: the exported graphs (ONNX, TensorRT, "
                             "AOTInductor) compute every layer and return every exit's logits for a server to choose "
                             "from, so stopping early saves no time there")
        return self

    @field_validator("batch", "seq")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError("give positive integers, e.g. 1,8,64")
        return v


class ReportConfig(Strict):
    """`kdship report`: HTML (and Markdown) from saved run folders."""

    runs: list[str] = Field(min_length=1)
    output: str = Field("report.html", description="HTML path; the Markdown goes beside it, as .md")
    title: str = "kdship report"
    verify: bool = Field(True, description="check each artifact's files against the sha256 in its manifest (the "
                                           "report shows its parity figures)")

    @field_validator("output")
    @classmethod
    def _not_markdown(cls, v: str) -> str:
        if v.lower().endswith(".md"):
            raise ValueError("give the HTML path (e.g. report.html); the Markdown is written beside it as .md")
        return v


class SpeedBudget(Strict):
    """A latency/throughput budget at one measured point of a bench run."""

    backend: str
    batch: int = Field(ge=1)
    seq: int = Field(ge=1)
    model: str | None = Field(None, description="bench model name; default: the last model (the student)")
    max_p99_ms: float | None = Field(None, gt=0)
    max_p50_ms: float | None = Field(None, gt=0)
    min_sequences_per_s: float | None = Field(None, gt=0)
    min_speedup: float | None = Field(None, gt=0, description="vs the bench baseline (the teacher)")

    @model_validator(mode="after")
    def _has_a_limit(self) -> "SpeedBudget":
        if all(v is None for v in (self.max_p99_ms, self.max_p50_ms, self.min_sequences_per_s, self.min_speedup)):
            raise ValueError("a speed budget needs a limit: max_p99_ms, max_p50_ms, min_sequences_per_s or min_speedup")
        return self


class ExitBudget(Strict):
    """The accuracy of a model with early exits at one exit threshold (its speed there: a speed budget whose model
    is NAME@exitT, as the bench names the row)."""

    threshold: float
    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_layers_saved: float | None = Field(None, ge=0, le=1, description="share of layers the average row skips")
    min_speedup: float | None = Field(None, gt=0, description="mean latency of all layers over that at this "
                                                              "threshold (real eval texts one at a time; bench)")
    model: str | None = Field(None, description="bench model name; default: the last model with exits")

    @model_validator(mode="after")
    def _has_a_limit(self) -> "ExitBudget":
        if self.min_accuracy is None and self.min_layers_saved is None and self.min_speedup is None:
            raise ValueError("an early-exit budget needs a limit: min_accuracy, min_layers_saved or min_speedup")
        return self


class BaselineTolerance(Strict):
    accuracy: float = Field(0.005, ge=0, le=1, description="largest accuracy drop vs the baseline")
    perplexity_ratio: float = Field(1.02, ge=1, description="causal LMs: largest perplexity growth vs the baseline")
    latency_ratio: float | None = Field(1.15, ge=1, description="largest p99 growth vs the baseline (ratio); null: "
                                        "latency is not compared with the baseline (shared CI runners, whose "
                                        "speed varies between runs: budget speed as min_speedup ratios instead)")


class Budgets(Strict):
    """A budgets file (YAML) for `kdship gate`."""

    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_recall_at_1: float | None = Field(None, ge=0, le=1, description="for dual-tower (match) models")
    min_retention: float | None = Field(None, ge=0, le=2)
    min_agreement: float | None = Field(None, ge=0, le=1)
    max_perplexity: float | None = Field(None, ge=1, description="causal LMs: the student's perplexity on the eval "
                                                                 "data")
    max_perplexity_ratio: float | None = Field(None, gt=0, description="causal LMs: student perplexity / teacher's")
    min_token_agreement: float | None = Field(None, ge=0, le=1, description="causal LMs: share of target tokens "
                                                                            "where the student's top next token is "
                                                                            "the teacher's")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="per export variant, vs PyTorch")
    max_model_mb: float | None = Field(None, gt=0, description="each exported model file")
    speed: list[SpeedBudget] = Field(default_factory=list)
    early_exit: list[ExitBudget] = Field(default_factory=list, description="accuracy at exit thresholds (bench "
                                                                           "--exit-threshold or kdship eval)")
    baseline_tolerance: BaselineTolerance = BaselineTolerance()


class GateConfig(Strict):
    """`kdship gate`: budgets -> exit code for CI."""

    budgets: str
    runs: list[str] = Field(min_length=1)
    junit: str | None = None
    json_out: str | None = None
    baseline: str | None = None
    update_baseline: bool = False
    verify: bool = Field(True, description="fail an artifact whose files differ from the sha256 in its manifest")
    allow_unstable: bool = Field(False, description="let speed budgets pass on measurements marked unstable")


class StageConfig(Strict):
    """One stage of a progressive pipeline: which teacher and data it uses (names or paths), its objective and
    losses, and any training setting that differs from the pipeline's `common` settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: str = Field(description="a name from teachers:, a folder or hub id, or `previous`: the student the "
                                     "stage before this one made (born-again generations)")
    data: str | DataConfig
    allow_multi_change: bool = Field(False, description="let this stage change more than one of teacher/data/objective")
    restart_student: bool = Field(False, description="start from the pipeline's student again, not from the "
                                                     "previous stage's (a fresh student for each generation)")
    settings: dict[str, Any] = Field(default_factory=dict, description="DistillConfig fields for this stage")

    @model_validator(mode="before")
    @classmethod
    def _collect_settings(cls, v: Any) -> Any:
        """Stage-level training keys (objective, losses, lr, ...) are gathered into `settings`."""
        if isinstance(v, dict):
            v = dict(v)
            settings = dict(v.pop("settings", {}))
            for key in [k for k in v if k in STAGE_SETTINGS]:
                settings[key] = v.pop(key)
            v["settings"] = settings
        return v


class PipelineConfig(Strict):
    """`kdship distill --recipe pipeline.yaml` with `stages:`: progressive multi-stage distillation. Each stage's
    student starts from the previous stage's; by default each stage changes exactly one of teacher, data and
    objective (the recipe validator enforces it)."""

    output: str | None = None
    student: str | None = None
    students: dict[str, str] | None = None
    teachers: dict[str, str] = Field(default_factory=dict, description="name -> folder or hub id")
    datasets: dict[str, DataConfig] = Field(default_factory=dict, description="name -> data settings")
    common: dict[str, Any] = Field(default_factory=dict, description="DistillConfig fields shared by every stage")
    stages: list[StageConfig] = Field(min_length=1)
    seed: int = 42
    device: Device = "auto"
    precision: Precision = "auto"
    resume: bool = False
    overwrite: bool = False
    keep_going: bool = Field(False, description="run the next stages even after a stage whose student collapsed")

    _named = field_validator("students", mode="before")(lambda cls, v: named_students(v))


# What a pipeline sets once for all stages (PipelineConfig's fields) or per stage by name (StageConfig's: teacher,
# data): every other DistillConfig field, and its flat spelling, is a stage setting.
PIPELINE_FIELDS = tuple(PipelineConfig.model_fields)
STAGE_SETTINGS = tuple(k for k in DistillConfig.model_fields
                       if k not in PIPELINE_FIELDS and k not in StageConfig.model_fields) + tuple(
    flat for flat, (group, _) in FLAT_SPELLINGS.items() if group in DistillConfig.model_fields)
