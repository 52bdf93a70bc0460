"""Load teachers and students: local dirs, hub ids, or shape specs; init students from teacher layers; projections."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from kdship.errors import ModelError, not_a_folder

# Shape-spec keys -> config attributes (transformers' attribute_map covers families with other names, e.g. DistilBERT).
SPEC_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "kv_heads": "num_key_value_heads", "ffn": "intermediate_size", "vocab": "vocab_size",
             "max_len": "max_position_embeddings"}
FFN_ALIASES = ("intermediate_size", "hidden_dim", "ffn_dim", "n_inner")
# a transformer layer's parameters, by family: encoder.layer.N. (BERT, RoBERTa, ELECTRA), transformer.layer.N.
# (DistilBERT), model.layers.N. (Llama, Qwen, Mistral), transformer.h.N. (GPT-2), block.N. (T5-likes)
LAYER_KEY = re.compile(r"\.(layer|layers|h|block)\.(\d+)\.")
# What a student made from a spec takes from its teacher unless the spec says otherwise.
INHERITED = ("vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
             "layer_norm_eps", "rms_norm_eps", "tie_word_embeddings")


# Families whose position ids start after the padding index, so they hold fewer tokens than their table has rows.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


def max_tokens(requested: int, *configs: Any) -> int:
    """The longest input every given model can take: `requested`, capped by each position table."""
    limits = [requested]
    for config in configs:
        positions = getattr(config, "max_position_embeddings", None)
        if positions:
            offset = (config.pad_token_id or 0) + 1 if config.model_type in OFFSET_POSITIONS else 0
            limits.append(positions - offset)
    return min(limits)


def lm_max_length(data: Any, limit: int) -> int:
    """A causal LM's sequence length, `limit` (max_tokens of the models): a --max-length set beyond a model's
    positions is refused instead of cut silently, since its sequences would be shorter than asked for."""
    if limit < data.max_length and "max_length" in data.model_fields_set:
        raise ModelError(f"--max-length {data.max_length} is longer than the model's {limit} positions; give "
                         f"--max-length {limit} or less")
    return limit


def expand_shorthand(source: str, family: str) -> str:
    """'4L312' -> a shape spec of the teacher's family: 4 layers, 312 wide, heads of 64 where possible, ffn 4x."""
    match = re.fullmatch(r"(\d+)L(\d+)", source.strip())
    if not match:
        return source
    layers, hidden = int(match.group(1)), int(match.group(2))
    heads = next(h for h in (hidden // 64 if hidden % 64 == 0 else 0, 12, 8, 6, 4, 3, 2, 1) if h and hidden % h == 0)
    return f"{family}:layers={layers},hidden={hidden},heads={heads},ffn={4 * hidden}"


def is_shape_spec(source: str) -> bool:
    return bool(re.fullmatch(r"[a-z][a-z0-9_-]*:[a-z_]+=\w+(,[a-z_]+=\w+)*", source.strip()))


def parse_shape_spec(spec: str) -> tuple[str, dict[str, int]]:
    """'bert:layers=4,hidden=312,heads=12,ffn=1200' -> ('bert', {'num_hidden_layers': 4, ...})."""
    family, _, body = spec.strip().partition(":")
    params: dict[str, int] = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key not in SPEC_KEYS:
            raise ModelError(f"shape spec {spec!r}: unknown key {key!r}; valid keys: {', '.join(SPEC_KEYS)}")
        if not value.isdigit() or int(value) < 1:
            raise ModelError(f"shape spec {spec!r}: {key} must be a positive integer, got {value!r}")
        params[SPEC_KEYS[key]] = int(value)
    return family, params


def config_from_spec(spec: str, base: Any = None) -> Any:
    """A transformers config of the spec's family; unspecified sizes come from `base` (the teacher) when given."""
    from transformers import AutoConfig

    family, params = parse_shape_spec(spec)
    try:
        config = AutoConfig.for_model(family)
    except ValueError:
        raise ModelError(f"shape spec {spec!r}: unknown model type {family!r}; use a transformers model type "
                         "such as bert, roberta, distilbert, electra") from None
    if base is not None:
        for name in INHERITED + ("hidden_size", "num_attention_heads"):
            if hasattr(base, name) and name not in params:
                setattr(config, name, getattr(base, name))
        if "intermediate_size" not in params and "hidden_size" not in params:
            _set_ffn(config, _get_ffn(base))
    for name, value in params.items():
        _set_ffn(config, value) if name == "intermediate_size" else setattr(config, name, value)
    if "hidden_size" in params and "intermediate_size" not in params:
        _set_ffn(config, 4 * params["hidden_size"])
    if config.hidden_size % config.num_attention_heads:
        raise ModelError(f"shape spec {spec!r}: hidden {config.hidden_size} is not divisible by heads "
                         f"{config.num_attention_heads}; pick heads that divide hidden")
    _fit_attention_heads(config, spec, params, base)
    return config


def _fit_attention_heads(config: Any, spec: str, params: dict[str, int], base: Any) -> None:
    """Decoder families with grouped-query attention keep a key/value head count and a head width beside the
    heads: left at the family's defaults (32 heads of 128 for Llama) they would not fit the spec's sizes. kv_heads
    defaults to the teacher's when the heads are the teacher's, else to the heads (plain multi-head attention)."""
    if hasattr(config, "num_key_value_heads"):
        if "num_key_value_heads" not in params:
            same_heads = base is not None and getattr(base, "num_attention_heads", None) == config.num_attention_heads
            config.num_key_value_heads = (getattr(base, "num_key_value_heads", None) if same_heads else None) or \
                config.num_attention_heads
        if config.num_attention_heads % config.num_key_value_heads:
            raise ModelError(f"shape spec {spec!r}: heads {config.num_attention_heads} is not a multiple of kv_heads "
                             f"{config.num_key_value_heads}; pick kv_heads that divide heads")
    elif "num_key_value_heads" in params:
        raise ModelError(f"shape spec {spec!r}: {config.model_type} has no grouped-query attention; drop kv_heads")
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = config.hidden_size // config.num_attention_heads


def _get_ffn(config: Any) -> int | None:
    return next((getattr(config, a) for a in FFN_ALIASES if hasattr(config, a)), None)


def _set_ffn(config: Any, value: int | None) -> None:
    name = next((a for a in FFN_ALIASES if hasattr(config, a)), "intermediate_size")
    if value is not None:
        setattr(config, name, value)


def _check_exists(source: str, role: str) -> None:
    if re.fullmatch(r"[a-z][a-z0-9_-]*:.*=.*", source.strip()):  # meant as a shape spec: say what is wrong with it
        parse_shape_spec(source)
        raise ModelError(f"{role} {source!r} is not a valid shape spec; write family:key=N,... with positive "
                         f"integers, keys from {', '.join(SPEC_KEYS)} (e.g. bert:layers=4,hidden=312)")
    looks_local = source.startswith((".", "/", "~")) or os.path.lexists(source) or source.count("/") > 1
    path = Path(source).expanduser()
    if looks_local and path.is_file():
        raise ModelError(f"{role} {source} is a file; give its save_pretrained folder (with config.json)")
    if looks_local and not path.is_dir():
        raise ModelError(f"{role} {not_a_folder(path)}; give a save_pretrained folder, a hub id, or a shape spec")


def load_config(source: str, role: str) -> Any:
    from transformers import AutoConfig

    _check_exists(source, role)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{role} {source!r} could not be loaded ({first}); give a save_pretrained folder "
                         "with config.json, or a reachable hub id") from None


def load_tokenizer(source: str, role: str) -> Any:
    from transformers import AutoTokenizer

    _check_exists(source, role)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{role} {source!r} has no usable tokenizer ({first}); save the tokenizer with the model "
                         "or pass --tokenizer") from None


def is_classifier(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def is_mlm(config: Any) -> bool:
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in (config.architectures or []))


def is_causal_lm(config: Any) -> bool:
    """A decoder that predicts the next token (GPT-2, Llama, Qwen, Mistral, ...): saved as one, or of a family
    that transformers builds only as one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    saved = config.architectures or []
    if saved:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in saved)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
        config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def model_kind(config: Any) -> str:
    """What a config says the model is, in the words of an error message."""
    names = config.architectures or [config.model_type]
    role = "a causal LM (decoder)" if is_causal_lm(config) else "an encoder"
    return f"{role} ({names[0]})"


def label_names_of(config: Any) -> list[str] | None:
    """The classifier's label names, or None for a model without a trained classification head."""
    if not is_classifier(config):
        return None
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def task_label_names(objective: str, config: Any) -> list[str] | None:
    """The labels a model was trained on, for an objective that reads labels: a classifier's, or those of a
    bi-encoder that classifies pairs. None when there are none (yet)."""
    from kdship.biencoder import biencoder_settings

    if objective == "match":
        return (biencoder_settings(config) or {}).get("label_names")
    return label_names_of(config) if objective == "classify" else None


_PICKLE_WEIGHTS_ALLOWED = contextvars.ContextVar("kdship_pickle_weights_allowed", default=False)


@contextlib.contextmanager
def weights_policy(allow_pickle: bool) -> Iterator[None]:
    """Within a command: whether weights saved as pickle (pytorch_model.bin) may be loaded. Unpickling runs code
    the file's author chose, so only safetensors load unless the user passes --allow-pickle-weights."""
    token = _PICKLE_WEIGHTS_ALLOWED.set(allow_pickle)
    try:
        yield
    finally:
        _PICKLE_WEIGHTS_ALLOWED.reset(token)


def under_weights_policy(command: Callable) -> Callable:
    """A command function `command(cfg, ...)` run under its config's allow_pickle_weights."""
    @functools.wraps(command)
    def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with weights_policy(cfg.allow_pickle_weights):
            return command(cfg, *args, **kwargs)

    return run


def _weights_kwargs(source: str) -> dict[str, Any]:
    if _PICKLE_WEIGHTS_ALLOWED.get():
        return {}
    folder = Path(source)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("pytorch_model*.bin")):
        raise ModelError(f"{source} holds only pickle weights (pytorch_model.bin), which can run code when loaded; "
                         "convert them to safetensors (save_pretrained) or pass --allow-pickle-weights")
    return {"use_safetensors": True}


def build_model(objective: str, source: str | None = None, config: Any = None, label_names: list[str] | None = None,
                attn_eager: bool = False, match_loss: str | None = None, keep_exits: bool = False) -> Any:
    """A classifier (objective 'classify'), masked-LM, causal LM ('clm'), or bi-encoder ('match', see
    kdship.biencoder) from a folder/hub id (`source`) or a fresh `config`. For a bi-encoder, `match_loss` in_batch
    drops a saved pair-classification head (the encoder alone scores pairs), classify keeps it, None takes what was
    saved."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from kdship.biencoder import SETTINGS_KEY, build_biencoder

    auto = {"classify": AutoModelForSequenceClassification, "clm": AutoModelForCausalLM}.get(objective,
                                                                                           AutoModelForMaskedLM)
    kwargs: dict[str, Any] = {"attn_implementation": "eager"} if attn_eager else {}
    if source is not None:
        kwargs |= _weights_kwargs(source)
    try:
        if objective == "match":
            return build_biencoder(source, config, label_names, kwargs, keep_head=match_loss != "in_batch")
        if label_names is not None:
            kwargs |= {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                       "label2id": {n: i for i, n in enumerate(label_names)}}
        if source is None:  # (no weights kwargs without a source)
            for key, value in kwargs.items():
                setattr(config, "_attn_implementation" if key == "attn_implementation" else key, value)
            model = auto.from_config(config)
        else:
            model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
            check_weights_loaded(model, info["missing_keys"], source, model.base_model_prefix)
        # what save_pretrained writes and a reload reads back: a classifier head added here (to a bare encoder, or a
        # fresh config) is known as one at once, by the checks that compare its labels with another model's
        model.config.architectures = [type(model).__name__]
        if hasattr(model.config, SETTINGS_KEY):  # a classifier or MLM made from a bi-encoder is no bi-encoder
            delattr(model.config, SETTINGS_KEY)
        return _with_saved_exits(model, objective, source, keep_exits)
    except OSError as e:  # a folder with config.json but no (or unreadable) weights
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{source}: weights could not be loaded ({first}); check the folder holds model.safetensors")
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:  # a damaged pickle, weights of another shape
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelError(f"{source}: weights could not be loaded ({type(e).__name__}: {first}); use a folder whose "
                         "weights match its config.json (re-save it with save_pretrained)") from None
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        families = "a decoder family such as llama, gpt2, qwen2" if objective == "clm" else \
            "an encoder family such as bert, roberta, distilbert"
        raise ModelError(f"{source or config.model_type}: cannot build a {objective} model ({first}); "
                         f"use {families}") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelError(f"{source}: model.safetensors is damaged or truncated ({str(e).splitlines()[0][:120]}); "
                         "copy it again or re-create the model") from None


def _with_saved_exits(model: Any, objective: str, source: str | None, keep: bool) -> Any:
    """A classifier saved with early exits comes back with them (their trained heads included) when `keep`: for
    what reads the exits (eval, export, early-exit inference) or trains them; everywhere else (a teacher, a plain
    runner, a student trained without exits) it is the plain classifier, whose exits would run for nothing or,
    untrained, ship stale."""
    from kdship.early_exit import SETTINGS_KEY as EXITS, early_exit_settings, with_exit_heads

    settings = early_exit_settings(model.config)
    if settings is None:
        return model
    if objective != "classify" or source is None or not keep:
        delattr(model.config, EXITS)
        return model
    return with_exit_heads(model, settings["layers"], source)


def check_weights_loaded(model: Any, missing: Any, source: str, prefix: str = "") -> None:
    """A model loaded from `source` must have found its body's weights there: transformers initialises missing
    weights at random with only a log line, so an empty or foreign weights file would give a random model that
    trains, evaluates and ships. A new head (a classifier on an encoder, a pooler) is expected and allowed."""
    body = sorted(k for k in missing if "pooler" not in k and (not prefix or k.startswith(f"{prefix}.")))
    if body:
        raise ModelError(f"{source}: its weights file lacks {len(body)} of the model's weights (e.g. {body[0]}), so "
                         "they would be random; use the folder the model was saved to with save_pretrained")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher hidden-state index for each student hidden state (index 0 = embeddings): every k-th layer."""
    if student_layers > teacher_layers:
        raise ModelError(f"student has {student_layers} layers, teacher {teacher_layers}; give layer_map explicitly")
    return [0] + [round((i + 1) * teacher_layers / student_layers) for i in range(student_layers)]


def init_from_teacher(student: Any, teacher: Any, layer_map: list[int]) -> int:
    """Copy embeddings and teacher layer layer_map[i+1]-1 into student layer i (DistilBERT-style), plus every other
    tensor of equal shape (pooler, heads). Returns the number of tensors copied."""
    teacher_state = teacher.state_dict()
    copied = 0
    new_state = {}
    for key, value in student.state_dict().items():
        source_key = LAYER_KEY.sub(lambda m: f".{m.group(1)}.{layer_map[int(m.group(2)) + 1] - 1}.", key)
        src = teacher_state.get(source_key)
        if src is not None and src.shape == value.shape:
            new_state[key] = src.clone()
            copied += 1
    student.load_state_dict(new_state, strict=False)
    return copied


def check_vocab_compatible(student_config: Any, tokenizer: Any, student_source: str) -> None:
    """The student reads the teacher's token ids, so its embedding table must cover the teacher's vocabulary."""
    if student_config.vocab_size < len(tokenizer):
        raise ModelError(
            f"student {student_source} has a vocabulary of {student_config.vocab_size} tokens but the teacher's "
            f"tokenizer has {len(tokenizer)}; use a student with the teacher's tokenizer (or a shape spec, which "
            "inherits it)")


def check_tokenizers_match(teacher_tok: Any, student_tok: Any, student_source: str) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ModelError(
            f"student {student_source} uses a different tokenizer than the teacher (vocabularies differ); "
            "distillation needs a shared vocabulary: use a student built for the teacher's tokenizer")


QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))  # BERT-likes,
# DistilBERT, Llama-likes: the self-attention's separate query, key and value projections


def attention_projections(model: Any, layer: int) -> tuple[Any, Any, Any]:
    """The query, key and value projection modules of transformer layer `layer` (negative counts from the top):
    the modules holding all three, one per layer, in the model's order."""
    per_layer = [found for m in model.modules() for names in QKV_NAMES
                 if (found := tuple(getattr(m, n, None) for n in names)) and all(f is not None for f in found)]
    if not per_layer:
        raise ModelError(f"{type(model).__name__} has no separate query/key/value projections kdship can find (looked "
                         f"for {', '.join('/'.join(n) for n in QKV_NAMES)}); use attention_kl or hidden losses instead "
                         "of qkv_relations")
    return per_layer[layer]


@contextlib.contextmanager
def captured_qkv(model: Any, layer: int) -> Iterator[list[Any]]:
    """Within the block, each forward call of `model` appends layer `layer`'s query, key and value outputs (each
    [batch, seq, width]) to the yielded list: what relation distillation matches, which models do not return."""
    captured: list[Any] = []
    handles = [m.register_forward_hook(lambda _m, _in, out: captured.append(out))
               for m in attention_projections(model, layer)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def relation_heads(student_config: Any, teacher_config: Any) -> int:
    """Relation heads for qkv_relations: the teacher's attention heads when they divide the student's width too
    (MiniLMv2 uses as many as the teacher has), else the largest count that divides both widths' head splits."""
    import math

    heads = teacher_config.num_attention_heads
    return heads if student_config.hidden_size % heads == 0 else math.gcd(heads, student_config.hidden_size)


@contextlib.contextmanager
def attention_dropout_off(model: Any) -> Iterator[None]:
    """Within the block, attention probabilities are not dropped out. Models return their attention maps after
    dropout, so in training a tenth of each map is zero and the rest scaled by 1/0.9 (BERT's 0.1): an attention loss
    on those maps has a floor of about 0.1·log(1e12) ≈ 2.8 that no student can go below, and gradients toward a
    corrupted target. Distillation reads the maps, so it turns that dropout off while they are computed."""
    from torch import nn

    restore: list[tuple[Any, str, float]] = []
    for module in model.modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout) and child.p:
                restore.append((child, "p", child.p))
                child.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            restore.append((module, "attention_dropout", module.attention_dropout))
            module.attention_dropout = 0.0
    try:
        yield
    finally:
        for owner, attribute, value in restore:
            setattr(owner, attribute, value)
