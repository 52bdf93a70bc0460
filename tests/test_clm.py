"""Causal-LM distillation on tiny random decoders of two families (Llama and GPT-2) made here: the token-level
losses as pure functions, causal-LM data (packed text, prompt/response, chat), train / distill / eval / gate / report
through the real CLI, resume after kill -9, and bad input refused in one line."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TINY_TEACHER, kdship, kdship_ok, kdship_process, sigkill_after_first_checkpoint
from kdship.data import IGNORED, LmTable, collate, load_lm_table, tokenize_lm
from kdship.errors import DataError
from kdship.losses import LossInputs, generalised_jsd, get_loss, reverse_kl, soft_kl, total_variation
from kdship.tokenizer import train_byte_bpe

LLAMA_TEACHER = "llama:layers=2,hidden=32,heads=4,kv_heads=2,ffn=64,max_len=64"
WORDS = "the cat dog sat ran on under mat rug house tree big small red blue quickly slowly and".split()


# ---- losses: pure functions ---------------------------------------------------------------------------------------


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("loss", [lambda s, t: soft_kl(s, t), lambda s, t: reverse_kl(s, t),
                                  lambda s, t: generalised_jsd(s, t, 0.3), lambda s, t: total_variation(s, t)])
def test_every_token_loss_is_zero_on_identical_distributions_and_positive_otherwise(loss):
    s, t = _logits(0), _logits(1)
    assert loss(s, s.clone()).abs().item() < 1e-6
    assert loss(s, t).item() > 1e-3


def test_jsd_ends_are_the_two_kls_and_its_middle_is_bounded_and_symmetric():
    s, t = _logits(0), _logits(1)
    assert torch.allclose(generalised_jsd(s, t, 0.0), soft_kl(s, t))
    assert torch.allclose(generalised_jsd(s, t, 1.0), reverse_kl(s, t))
    middle = generalised_jsd(s, t, 0.5)
    assert 0 < middle.item() <= math.log(2) + 1e-6
    assert torch.allclose(middle, generalised_jsd(t, s, 0.5), atol=1e-6)
    assert soft_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item())  # the two directions differ


def test_token_losses_read_only_target_positions_and_scale_with_temperature_squared():
    s, t = _logits(0), _logits(1)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, :2] = True
    changed = s.clone()
    changed[:, 2:] += 5.0  # a change where no target is
    for loss in (soft_kl, reverse_kl, total_variation):
        assert torch.allclose(loss(s, t, mask=mask), loss(changed, t, mask=mask))
    assert 0 <= total_variation(s, t).item() <= 1
    # T² keeps the size of the KL term: at T=4 it is T² times the KL of the softened distributions
    soft = soft_kl(s / 4, t / 4)
    assert torch.allclose(soft_kl(s, t, temperature=4.0), soft * 16)


# ---- data ----------------------------------------------------------------------------------------------------------


def _write_text(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "\n"
                            for _ in range(lines)))
    return path


def _write_prompt_response(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            words = [rng.choice(WORDS) for _ in range(4)]
            f.write(json.dumps({"prompt": "repeat: " + " ".join(words), "response": " " + " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm-data")
    _write_text(root / "train.txt", 500, 1)
    _write_text(root / "dev.txt", 60, 2)
    _write_prompt_response(root / "train.jsonl", 200, 3)
    _write_prompt_response(root / "dev.jsonl", 30, 4)
    return root


@pytest.fixture(scope="module")
def tokenizer(lm_data: Path):
    return train_byte_bpe(lm_data.joinpath("train.txt").read_text().splitlines() + ["repeat:"], 300)


def test_packed_text_blocks_have_every_next_token_as_target(lm_data, tokenizer):
    encoded = tokenize_lm(tokenizer, load_lm_table(str(lm_data / "train.txt")), 16)
    assert all(len(f["input_ids"]) <= 16 for f in encoded.features)
    assert sum(len(f["input_ids"]) == 16 for f in encoded.features) >= len(encoded.features) - 1
    for f in encoded.features[:5]:
        assert f["labels"][:-1] == f["input_ids"][1:] and f["labels"][-1] == IGNORED
    stream = [t for f in encoded.features for t in f["input_ids"]]
    assert stream.count(tokenizer.eos_token_id) == 500  # one end-of-text after each line, nothing lost


def test_prompt_response_targets_are_the_response_and_its_end(lm_data, tokenizer):
    table = load_lm_table(str(lm_data / "train.jsonl"))
    assert table.kind == "prompt_response"
    feature = tokenize_lm(tokenizer, table, 64).features[0]
    prompt, response = table.items[0]
    prompt_ids = tokenizer(prompt)["input_ids"]
    targets = [t for t in feature["labels"] if t != IGNORED]
    assert targets == tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert feature["labels"][:len(prompt_ids) - 1] == [IGNORED] * (len(prompt_ids) - 1)
    batch = collate(tokenizer, tokenize_lm(tokenizer, table, 64), [0, 1, 2])
    padded = batch["attention_mask"].eq(0)
    assert batch["labels"][padded].eq(IGNORED).all() and batch["input_ids"].shape == batch["labels"].shape


def test_chat_targets_are_the_assistant_turns_alone(tmp_path, tokenizer):
    tokenizer = train_byte_bpe(["user says hello", "assistant answers hi there"], 280)
    tokenizer.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}")
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "hi"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = load_lm_table(str(tmp_path / "chat.jsonl"))
    feature = tokenize_lm(tokenizer, table, 128).features[0]
    targets = tokenizer.decode([t for t in feature["labels"] if t != IGNORED])
    assert "hi there" in targets and "hi" in targets and "hello" not in targets and "again" not in targets


def test_examples_too_long_for_max_length_are_dropped_and_counted_or_refused(lm_data, tokenizer):
    table = load_lm_table(str(lm_data / "train.jsonl"))
    encoded = tokenize_lm(tokenizer, LmTable(table.kind, [table.items[0], ("x " * 200, "y")], "t", "f"), 24)
    assert len(encoded.features) == 1 and encoded.dropped == 1
    with pytest.raises(DataError, match="max_length 8"):
        tokenize_lm(tokenizer, LmTable(table.kind, [("x " * 200, "y")], "t", "f"), 8)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p"}, "no prompt and response columns"),
    ({"prompt": "p", "response": ""}, "response not empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least one assistant turn"),
    ({"messages": "hello"}, "list of {role, content}"),
])
def test_causal_lm_rows_without_their_fields_are_refused_in_one_line(tmp_path, row, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_lm_table(str(tmp_path / "bad.jsonl"))


# ---- train, distill, eval, gate, report through the CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_teacher(lm_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama pre-trained with `kdship train --objective clm` and its own byte-level BPE."""
    out = tmp_path_factory.mktemp("lm-models") / "teacher"
    kdship_ok("train", "--init", LLAMA_TEACHER, "--objective", "clm", "--data", lm_data / "train.txt", "--eval-data",
              lm_data / "dev.txt", "--max-steps", 80, "--batch-size", 8, "--lr", "3e-3", "--max-length", 32,
              "--vocab-size", 300, "--eval-every", 40, "-o", out)
    return out


def _record(folder: Path) -> dict:
    return json.loads((folder / "kdship.json").read_text())


def test_train_clm_learns_text_and_saves_a_decoder_that_round_trips_text(lm_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = _record(lm_teacher)
    assert record["training"]["loss_last"] < record["training"]["loss_first"] - 1.0
    assert record["metrics"]["perplexity"] == pytest.approx(math.exp(record["metrics"]["lm_loss"]))
    assert record["metrics"]["perplexity"] < 40  # 300 tokens: a model that learned nothing is near 300
    assert record["data"]["train"]["kind"] == "text" and record["data"]["train"]["target_tokens"] > 1000
    tokenizer = AutoTokenizer.from_pretrained(lm_teacher)
    assert tokenizer.decode(tokenizer("The Cat sat, quickly!")["input_ids"]) == "The Cat sat, quickly!"
    model = AutoModelForCausalLM.from_pretrained(lm_teacher)
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.num_key_value_heads == 2


def test_a_student_identical_to_its_teacher_starts_at_zero_kl(lm_teacher, lm_data, tmp_path):
    kdship_ok("distill", "--teacher", lm_teacher, "--student", lm_teacher, "--objective", "clm", "--data",
              lm_data / "train.txt", "--loss", "forward_kl", "--max-steps", 1, "--batch-size", 8, "--max-length", 32,
              "-o", tmp_path / "same")
    assert _record(tmp_path / "same")["training"]["loss_first"] < 1e-6  # (the first step: one step has no window)


@pytest.mark.parametrize("student, loss", [("llama:layers=1", "jsd"), ("gpt2:layers=1,hidden=32,heads=2", "reverse_kl"),
                                           ("llama:layers=1", "tvd")])
def test_distill_clm_students_of_either_family_learn_from_the_teacher(lm_teacher, lm_data, tmp_path, student, loss):
    out = tmp_path / "student"
    kdship_ok("distill", "--teacher", lm_teacher, "--student", student, "--objective", "clm", "--data",
              lm_data / "train.txt", "--eval-data", lm_data / "dev.txt", "--loss", loss, "--loss", "ce:0.5",
              "--max-steps", 60, "--eval-every", 20, "--batch-size", 8, "--max-length", 32, "--jsd-beta", "0.3",
              "-o", out)
    record = _record(out)
    assert record["config"]["objective"] == "clm" and record["config"]["jsd_beta"] == 0.3
    assert record["training"]["loss_last"] < record["training"]["loss_first"]
    perplexities = [h["perplexity"] for h in record["history"]]
    assert perplexities[-1] < perplexities[0] and record["metrics"]["perplexity"] < 300  # 300: a uniform guess
    copied = record["student"]["tensors_copied_from_teacher"]
    assert (copied > 0) == student.startswith("llama")  # same family and width: the teacher's layers to start from


def test_distill_clm_on_prompt_response_data_then_eval_gate_and_report(lm_teacher, lm_data, tmp_path):
    out = tmp_path / "student"
    kdship_ok("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
              lm_data / "train.jsonl", "--loss", "forward_kl", "--max-steps", 20, "--batch-size", 8,
              "--max-length", 32, "-o", out)
    assert _record(out)["data"]["train"]["kind"] == "prompt_response"
    kdship_ok("eval", out, "--teacher", lm_teacher, "--data", lm_data / "dev.jsonl", "--generations", 3,
              "--max-new-tokens", 6)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["objective"] == "clm" and ev["data"]["kind"] == "prompt_response"
    assert ev["student"]["tokens"] == ev["teacher"]["tokens"] > 0
    assert ev["comparison"]["perplexity_ratio"] == pytest.approx(ev["student"]["perplexity"] / ev["teacher"]["perplexity"])
    assert 0 <= ev["comparison"]["token_agreement"] <= 1
    assert len(ev["generations"]["samples"]) == 3 and ev["generations"]["samples"][0]["prompt"].startswith("repeat:")

    (tmp_path / "pass.yaml").write_text(f"max_perplexity_ratio: {ev['comparison']['perplexity_ratio'] + 0.01}\n"
                                        "min_token_agreement: 0.0\n")
    kdship_ok("gate", "--budgets", tmp_path / "pass.yaml", out)
    (tmp_path / "fail.yaml").write_text(f"max_perplexity: {ev['student']['perplexity'] * 0.5}\n")
    failed = kdship("gate", "--budgets", tmp_path / "fail.yaml", out)
    assert failed.exit_code == 1 and "perplexity" in failed.output
    (tmp_path / "wrong.yaml").write_text("min_accuracy: 0.5\n")
    wrong = kdship("gate", "--budgets", tmp_path / "wrong.yaml", out)
    assert wrong.exit_code == 2 and "max_perplexity" in wrong.stderr
    kdship_ok("report", out, "-o", tmp_path / "report.html")
    markdown = (tmp_path / "report.md").read_text()
    assert "perplexity_ratio" in markdown and "Greedy generations" in markdown


def test_eval_of_a_student_identical_to_the_teacher_agrees_on_every_token(lm_teacher, lm_data, tmp_path):
    kdship_ok("eval", lm_teacher, "--teacher", lm_teacher, "--objective", "clm", "--data", lm_data / "dev.txt", "-o",
              tmp_path / "e.json", "--generations", 2)
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["comparison"] == {"perplexity_ratio": 1.0, "token_agreement": 1.0}
    assert all(s["student"] == s["teacher"] for s in ev["generations"]["samples"])


def test_several_students_and_sample_value_selection_work_on_causal_lms(lm_teacher, lm_data, tmp_path):
    common = ["--objective", "clm", "--data", lm_data / "train.txt", "--eval-data", lm_data / "dev.txt",
              "--max-steps", 10, "--batch-size", 8, "--max-length", 32]
    kdship_ok("distill", "--teacher", lm_teacher, "--students", "llama:layers=1,gpt2:layers=1,hidden=32,heads=2",
              *common, "-o", tmp_path / "students")
    for name in ("llama_layers_1", "gpt2_layers_1_hidden_32_heads_2"):
        assert _record(tmp_path / "students" / name)["metrics"]["perplexity"] > 1
    # selection scores each sequence by its mean next-token loss under the small and the large model
    kdship_ok("train", "--model", lm_teacher, "--select-by", lm_teacher, *common, "-o", tmp_path / "selected")
    selection = _record(tmp_path / "selected")["selection"]
    assert selection["selected"] == selection["candidates"] // 2
    assert selection["mean_value_selected"] >= selection["mean_value_rejected"]


def _distill_args(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", "llama:layers=1", "--objective", "clm", "--data",
            str(data / "train.txt"), "--loss", "jsd", "--max-steps", "150", "--batch-size", "8", "--max-length", "32",
            "--save-every", "5", "-o", str(out), *extra]


@pytest.mark.parametrize("cache", [[], ["--teacher-cache", "topk:16"]], ids=["live", "topk-cache"])
def test_clm_distillation_killed_with_sigkill_resumes_to_the_uninterrupted_weights(lm_teacher, lm_data, tmp_path,
                                                                                    cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    reference = kdship_process(_distill_args(lm_teacher, lm_data, straight, *cache))
    victim = kdship_process(_distill_args(lm_teacher, lm_data, resumed, *cache))
    sigkill_after_first_checkpoint(victim, resumed, settle_s=0.2)
    assert not resumed.exists()
    finished = kdship_process(_distill_args(lm_teacher, lm_data, resumed, "--resume", *cache))
    assert finished.wait() == 0, finished.stderr.read()
    assert reference.wait() == 0, reference.stderr.read()
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if cache:  # the resumed run read the cache its first start wrote
        assert _record(resumed)["training"]["teacher_topk_cache"]["k"] == 16


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------------------


def _refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name(f".{out.name}.kdship-run").exists()


def test_an_encoder_teacher_for_clm_and_a_decoder_teacher_for_classify_are_refused(lm_teacher, lm_data, teacher_dir,
                                                                                    data_dir, tmp_path):
    out = tmp_path / "out"
    _refused(kdship("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--objective", "clm",
                    "--data", lm_data / "train.txt", "-o", out), "needs a decoder teacher", out)
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--data",
                    data_dir / "train.tsv", "-o", out), "distil it with --objective clm", out)
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", TINY_TEACHER, "--objective", "clm", "--data",
                    lm_data / "train.txt", "-o", out), "give a student of the teacher's kind", out)
    _refused(kdship("eval", teacher_dir, "--objective", "clm", "--data", data_dir / "dev.tsv", "-o", out),
             "--objective clm, but student", out)


def test_a_student_with_another_vocabulary_is_refused_before_training(lm_teacher, lm_data, tmp_path):
    other = tmp_path / "other"
    kdship_ok("train", "--init", "llama:layers=1,hidden=32,heads=4,ffn=64,max_len=64", "--objective", "clm",
              "--data", lm_data / "train.jsonl", "--max-steps", 1, "--vocab-size", 280, "-o", other)
    out = tmp_path / "out"
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", other, "--objective", "clm", "--data",
                    lm_data / "train.txt", "-o", out), "different tokenizer", out)


def test_sequences_longer_than_the_positions_and_data_without_fields_are_refused(lm_teacher, lm_data, tmp_path):
    out = tmp_path / "out"
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm",
                    "--data", lm_data / "train.txt", "--max-length", 512, "-o", out), "longer than the model's", out)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm",
                    "--data", tmp_path / "bad.jsonl", "-o", out), "no prompt and response columns", out)


# ---- top-K teacher cache ------------------------------------------------------------------------------------------


def _support_inputs(s: torch.Tensor, t: torch.Tensor, k: int, **kw) -> LossInputs:
    top = F.log_softmax(t, -1).topk(k, -1)
    return LossInputs(student_logits=s, teacher_logits=top.values, teacher_token_ids=top.indices, **kw)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "kd"])
def test_a_top_k_cache_as_large_as_the_vocabulary_gives_the_full_loss(name):
    s, t = _logits(0), _logits(1)
    full = get_loss(name).fn(LossInputs(student_logits=s, teacher_logits=t, temperature=2.0, beta=0.3))
    cached = get_loss(name).fn(_support_inputs(s, t, s.shape[-1], temperature=2.0, beta=0.3))
    assert torch.allclose(full, cached, atol=1e-5)


def test_a_smaller_top_k_compares_the_teachers_k_tokens_and_one_bucket_for_the_rest():
    s, t = _logits(0), _logits(1)
    x = _support_inputs(s, t, 4)
    ids = x.teacher_token_ids

    def buckets(p: torch.Tensor) -> torch.Tensor:
        on = p.gather(-1, ids)
        return torch.cat([on, 1 - on.sum(-1, keepdim=True)], -1)

    teacher, student = buckets(F.softmax(t, -1)), buckets(F.softmax(s, -1))
    expected = (teacher * (teacher.log() - student.log())).sum(-1).mean()
    assert torch.allclose(get_loss("forward_kl").fn(x), expected, atol=1e-5)
    # the student's mass outside the teacher's top K counts: moved there, the loss grows (renormalising the student
    # over the K tokens alone would not see it, and a student trained so lost its perplexity: benchmarks/clm_distill)
    off = s.clone().scatter_add_(-1, ids, torch.full(ids.shape, -2.0))
    assert get_loss("forward_kl").fn(_support_inputs(off, t, 4)).item() > get_loss("forward_kl").fn(x).item() + 0.1
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):  # the teacher itself scores zero under each
        assert abs(get_loss(name).fn(_support_inputs(t, t, 4)).item()) < 1e-5


def _cache_args(teacher: Path, data: Path, out: Path, *extra) -> list:
    return ["distill", "--teacher", teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
            data / "train.txt", "--loss", "forward_kl", "--batch-size", 8, "--max-length", 32, "-o", out, *extra]


def test_distill_from_a_full_top_k_cache_starts_at_the_live_teachers_loss(lm_teacher, lm_data, tmp_path):
    kdship_ok(*_cache_args(lm_teacher, lm_data, tmp_path / "live", "--max-steps", 1))
    kdship_ok(*_cache_args(lm_teacher, lm_data, tmp_path / "cached", "--max-steps", 1, "--teacher-cache", "topk:300"))
    live, cached = _record(tmp_path / "live")["training"], _record(tmp_path / "cached")["training"]
    assert cached["loss_first"] == pytest.approx(live["loss_first"], rel=1e-3)  # (log-probabilities stored in fp16)
    assert live["teacher_forward_calls"] == 1 and cached["teacher_forward_calls"] == 0
    topk = cached["teacher_topk_cache"]
    assert topk["k"] == 300 and topk["bytes_per_token"] == 300 * 6 and topk["mean_tail_mass"] < 1e-3
    assert topk["tokens"] == _record(tmp_path / "cached")["data"]["train"]["target_tokens"]


def test_cache_teacher_then_distill_without_loading_the_teacher(lm_teacher, lm_data, tmp_path, monkeypatch):
    import numpy as np

    cache = tmp_path / "cache"
    made = kdship_ok("cache-teacher", "--teacher", lm_teacher, "--data", lm_data / "train.txt", "--top-k", 8,
                     "--max-length", 32, "-o", cache)
    assert "top-8 of" in made.stdout
    manifest = json.loads((cache / "cache.json").read_text())
    log_probs, ids = np.load(cache / "log_probs-00000.npy", mmap_mode="r"), np.load(cache / "token_ids-00000.npy")
    assert log_probs.dtype == np.float16 and ids.dtype == np.int32 and log_probs.shape == (manifest["tokens"], 8)
    assert (np.diff(log_probs.astype(np.float32), axis=1) <= 0).all() and ids.max() < 300  # most likely first
    assert 0 < manifest["mean_tail_mass"] < 1 and manifest["teacher"]["teachers"][0]["weights_sha256"]

    out = tmp_path / "student"  # the teacher named by a relative path when cached, an absolute one now: the same
    monkeypatch.chdir(lm_teacher.parent)
    kdship_ok("cache-teacher", "--teacher", lm_teacher.name, "--data", lm_data / "train.txt", "--top-k", 8,
              "--max-length", 32, "-o", cache, "--overwrite")
    kdship_ok(*_cache_args(lm_teacher, lm_data, out, "--max-steps", 30, "--teacher-cache", cache, "--loss", "ce:0.5"))
    training = _record(out)["training"]
    assert training["teacher_read"] is False and training["teacher_forward_calls"] == 0
    assert training["teacher_topk_cache"]["k"] == 8 and training["loss_last"] < training["loss_first"]


def test_a_cache_of_other_data_or_another_teacher_and_a_k_beyond_the_vocabulary_are_refused(lm_teacher, lm_data,
                                                                                             tmp_path):
    cache = tmp_path / "cache"
    kdship_ok("cache-teacher", "--teacher", lm_teacher, "--data", lm_data / "train.txt", "--top-k", 4,
              "--max-length", 32, "--max-train-samples", 100, "-o", cache)
    _refused(kdship(*_cache_args(lm_teacher, lm_data, tmp_path / "a", "--teacher-cache", cache)),
             "made from other data", tmp_path / "a")
    other = tmp_path / "other-teacher"  # same tokenizer and vocabulary, other weights
    kdship_ok(*_cache_args(lm_teacher, lm_data, other, "--max-steps", 2))
    _refused(kdship(*_cache_args(other, lm_data, tmp_path / "b", "--teacher-cache", cache, "--max-train-samples",
                                 100)), "made by another teacher", tmp_path / "b")
    _refused(kdship("cache-teacher", "--teacher", lm_teacher, "--data", lm_data / "train.txt", "--top-k", 301,
                    "-o", tmp_path / "c"), "K 301 must be between 1 and the vocabulary size 300", tmp_path / "c")
    _refused(kdship(*_cache_args(lm_teacher, lm_data, tmp_path / "d", "--teacher-cache", tmp_path / "missing")),
             "is not a complete kdship top-K cache", tmp_path / "d")
    _refused(kdship(*_cache_args(lm_teacher, lm_data, tmp_path / "e", "--teacher-cache", "topk:8", "--loss",
                                 "hidden_mse")), "read the teacher's layers", tmp_path / "e")
    _refused(kdship(*_cache_args(lm_teacher, lm_data, tmp_path / "f", "--teacher-cache", "topk:x")),
             "topk:K", tmp_path / "f")
    (tmp_path / "a-file").write_text("")
    refused = kdship("cache-teacher", "--teacher", lm_teacher, "--data", lm_data / "train.txt", "--top-k", 4, "-o",
                     tmp_path / "a-file")
    assert refused.exit_code == 2 and "is a file" in refused.stderr and "Traceback" not in refused.output
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
                    lm_data / "train.txt", "--loss", "ce", "--teacher-cache", "topk:8", "-o", tmp_path / "g"),
             "no loss reads the teacher", tmp_path / "g")


# ---- sequence-level KD (kdship generate) and on-policy distillation ------------------------------------------------


def test_generate_writes_a_transfer_set_that_distill_reads_and_records_its_sampling(lm_teacher, lm_data, tmp_path):
    out = tmp_path / "gen.jsonl"
    made = kdship_ok("generate", "--model", lm_teacher, "--prompts", lm_data / "train.jsonl", "--max-prompts", 20,
                     "--max-new-tokens", 10, "--temperature", "0.7", "--top-k", 20, "--samples-per-prompt", 2,
                     "--batch-size", 6, "-o", out)
    assert "responses to 20 prompts" in made.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (lm_data / "train.jsonl").read_text().splitlines()[:20]]
    facts = json.loads((tmp_path / "gen.jsonl.kdship.json").read_text())
    assert len(rows) == facts["rows"] == 40 - facts["empty_dropped"] and all(r["response"].strip() for r in rows)
    assert {r["prompt"] for r in rows} <= set(prompts) and facts["generated_tokens"] > 0
    assert facts["config"]["sampling"] == {"max_new_tokens": 10, "do_sample": True, "temperature": 0.7, "top_p": 1.0,
                                           "top_k": 20}
    assert facts["model"]["weights_sha256"] and facts["prompts"]["kind"] == "prompts"  # (responses ignored)
    again = tmp_path / "again.jsonl"  # the same seed draws the same samples
    kdship_ok("generate", "--model", lm_teacher, "--prompts", lm_data / "train.jsonl", "--max-prompts", 20,
              "--max-new-tokens", 10, "--temperature", "0.7", "--top-k", 20, "--samples-per-prompt", 2,
              "--batch-size", 6, "-o", again)
    assert again.read_text() == out.read_text()
    greedy = tmp_path / "greedy.jsonl"
    kdship_ok("generate", "--model", lm_teacher, "--prompts", lm_data / "dev.txt", "--greedy", "--max-prompts", 3,
              "--max-new-tokens", 5, "-o", greedy)
    assert json.loads((tmp_path / "greedy.jsonl.kdship.json").read_text())["prompts"]["kind"] == "text"

    student = tmp_path / "student"  # sequence-level KD: a normal clm run on the teacher's outputs
    kdship_ok("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data", out,
              "--loss", "ce", "--max-steps", 5, "--batch-size", 8, "--max-length", 32, "-o", student)
    assert _record(student)["data"]["train"]["kind"] == "prompt_response"
    _refused(kdship("generate", "--model", lm_teacher, "--prompts", lm_data / "dev.txt", "-o", out),
             "already exists", tmp_path / "never")
    _refused(kdship("generate", "--model", lm_teacher, "--prompts", tmp_path / "missing.txt", "-o",
                    tmp_path / "x.jsonl"), "missing.txt", tmp_path / "x.jsonl")


def test_generate_reads_a_prompt_column_skips_prompts_too_long_and_refuses_chat_without_a_template(lm_teacher,
                                                                                                  tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat"}) + "\n" + json.dumps({"prompt": "dog " * 80}) + "\n")
    kdship_ok("generate", "--model", lm_teacher, "--prompts", prompts, "--max-new-tokens", 4, "-o", tmp_path / "g.jsonl")
    facts = json.loads((tmp_path / "g.jsonl.kdship.json").read_text())
    assert facts["prompts"]["kind"] == "prompts" and facts["prompts"]["skipped_too_long_or_empty"] == 1  # 64 positions
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    _refused(kdship("generate", "--model", lm_teacher, "--prompts", chat, "-o", tmp_path / "c.jsonl"),
             "no chat template", tmp_path / "c.jsonl")


def test_on_policy_batches_are_the_students_samples_of_the_prompts(lm_teacher, lm_data):
    from kdship.config import OnPolicyConfig
    from kdship.data import collate
    from kdship.generation import continuations
    from kdship.loop import StepInput
    from kdship.models import build_model
    from kdship.techniques.on_policy import OnPolicy

    model = build_model("clm", source=str(lm_teacher))
    tokenizer = _lm_tokenizer(lm_teacher)
    encoded = tokenize_lm(tokenizer, load_lm_table(str(lm_data / "train.jsonl")), 32)
    batch = collate(tokenizer, encoded, list(range(6)))
    settings = OnPolicyConfig(ratio=1.0, max_new_tokens=8, temperature=1.0)
    technique = OnPolicy(settings, model, tokenizer, max_length=32, seed=0)
    seen = []
    step = technique.wrap(lambda x: seen.append(x) or "result")
    assert step(StepInput(batch, list(range(6)), step=3, progress=0.1)) == "result"
    sampled = seen[0].tensors
    for row in range(6):
        first = int(batch["labels"][row].ne(IGNORED).nonzero()[0])
        prompt = batch["input_ids"][row, :first + 1]
        assert torch.equal(sampled["input_ids"][row, :first + 1], prompt)  # the prompt is kept
        targets = sampled["labels"][row][sampled["labels"][row] != IGNORED]
        positions = sampled["labels"][row].ne(IGNORED).nonzero().flatten()
        assert torch.equal(sampled["input_ids"][row, positions + 1], targets)  # targets: the next sampled token
        assert int(positions[0]) == first and 1 <= len(targets) <= 8
    prompts = [batch["input_ids"][r, :int(batch["labels"][r].ne(IGNORED).nonzero()[0]) + 1].tolist() for r in range(6)]
    drawn = continuations(model, prompts, settings, tokenizer.pad_token_id, tokenizer.eos_token_id, torch.device("cpu"),
                          seed=0 * 1_000_003 + 3 * 10_007 + 0)
    for row, tokens in enumerate(drawn):  # exactly what the student samples under the step's seed
        labels = sampled["labels"][row]
        assert labels[labels != IGNORED].tolist() == tokens
    assert int(technique.counts.on_policy_batches) == 1 and int(technique.counts.sampled_tokens) == sum(map(len, drawn))
    assert not OnPolicy(settings.model_copy(update={"ratio": 0.01}), model, tokenizer, 32, 0).on_policy_at(3)


def _lm_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_distill_with_on_policy_batches_records_them_and_refuses_plain_text(lm_teacher, lm_data, tmp_path):
    out = tmp_path / "student"
    kdship_ok("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
              lm_data / "train.jsonl", "--max-steps", 8, "--batch-size", 4, "--max-length", 32,
              "--on-policy-ratio", "0.5", "--on-policy-max-new-tokens", 6, "-o", out)
    assert [loss["name"] for loss in _record(out)["config"]["losses"]] == ["jsd"]  # GKD's default: the divergence
    on_policy = _record(out)["on_policy"]
    assert on_policy["ratio"] == 0.5 and on_policy["micro_batches"] == 8
    assert 0 < on_policy["on_policy_batches"] < 8 and on_policy["sampled_tokens"] > 0
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
                    lm_data / "train.txt", "--on-policy-ratio", "0.5", "-o", tmp_path / "text"), "plain text",
             tmp_path / "text")
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
                    lm_data / "train.jsonl", "--on-policy-ratio", "0.5", "--loss", "jsd", "--loss", "ce", "-o",
                    tmp_path / "ce"), "would train the student on its own samples", tmp_path / "ce")
    _refused(kdship("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
                    lm_data / "train.jsonl", "--on-policy-ratio", "0.5", "--teacher-cache", "topk:8", "-o",
                    tmp_path / "cached"), "without a top-K teacher cache", tmp_path / "cached")


def test_a_progressive_pipeline_from_text_to_prompt_response_data(lm_teacher, lm_data, tmp_path):
    recipe = tmp_path / "progressive.yaml"
    recipe.write_text(f"""
teachers: {{lm: {lm_teacher}}}
datasets:
  text: {{train: {lm_data / 'train.txt'}, max_length: 32}}
  instructions: {{train: {lm_data / 'train.jsonl'}, max_length: 32}}
student: llama:layers=1
common: {{objective: clm, batch_size: 8, temperature: 1.0}}
stages:
  - {{name: general, teacher: lm, data: text, losses: [{{name: forward_kl}}], max_steps: 3}}
  - {{name: instructions, teacher: lm, data: instructions, losses: [{{name: forward_kl}}], max_steps: 3}}
""")
    kdship_ok("distill", "--recipe", recipe, "-o", tmp_path / "out")
    first, second = (_record(tmp_path / "out" / "stages" / name) for name in ("01-general", "02-instructions"))
    assert first["data"]["train"]["kind"] == "text" and second["data"]["train"]["kind"] == "prompt_response"
    assert Path(second["student"]["source"]).name == "01-general"  # stage 2 continues stage 1's student
