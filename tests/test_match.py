"""Dual-tower (bi-encoder) matching: pair encoding, in-batch and pair-classification heads, retrieval metrics, and
reverse distillation and sample-value selection on it, end to end with resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import kdship, kdship_ok
from kdship.biencoder import BiEncoder, embed_pairs, retrieval_metrics
from kdship.data import TextTable, collate, tokenize
from kdship.models import build_model, config_from_spec, load_tokenizer
from kdship.synthetic import write_pairs
from kdship.techniques.reverse import ReverseDistillation
from kdship.techniques.selection import example_losses

TINY = "bert:layers=2,hidden=32,heads=2,ffn=64,max_len=64"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_pairs(root / "train.tsv", 320, seed=1)
    write_pairs(root / "dev.tsv", 80, seed=2)
    write_pairs(root / "labelled.tsv", 320, seed=3, labelled=True)
    write_pairs(root / "labelled_dev.tsv", 80, seed=4, labelled=True)
    return root


@pytest.fixture(scope="module")
def small_matcher(pairs, tmp_path_factory):
    """A 2-layer bi-encoder trained with in-batch negatives; its tokenizer is trained on the pairs."""
    out = tmp_path_factory.mktemp("match") / "small"
    kdship_ok("train", "--init", TINY, "--vocab-size", 200, "--objective", "match", "--data", pairs / "train.tsv",
              "--eval-data", pairs / "dev.tsv", "--max-steps", 60, "--batch-size", 16, "--lr", "2e-3", "-o", out)
    return out


def _tiny_biencoder(layers: int, hidden: int, labels=None) -> BiEncoder:
    config = config_from_spec(f"bert:layers={layers},hidden={hidden},heads=2,ffn={2 * hidden},max_len=64,vocab=50")
    return build_model("match", config=config, label_names=labels)


def _batch(n: int = 4, length: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = lambda: torch.randint(5, 50, (n, length))  # noqa: E731
    mask = torch.ones(n, length, dtype=torch.long)
    return {"input_ids": ids(), "attention_mask": mask, "input_ids_b": ids(), "attention_mask_b": mask.clone()}


def test_pairs_are_encoded_apart_and_padded_to_one_length(small_matcher):
    tokenizer = load_tokenizer(str(small_matcher), "model")
    table = TextTable([("the plot was good", "honestly , the plot is really good and the cast was great"),
                       ("the cast felt dull", "the cast was dull")], None, "mem", "x")
    encoded = tokenize(tokenizer, table, 64, None, apart=True)
    assert encoded.features[0]["input_ids"] == tokenizer("the plot was good")["input_ids"]  # left side alone
    assert encoded.lengths()[0] == len(encoded.features[0]["input_ids_b"])  # the longer side counts
    batch = collate(tokenizer, encoded, [0, 1])
    assert batch["input_ids"].shape == batch["input_ids_b"].shape == (2, encoded.lengths()[0])
    assert batch["attention_mask"][0].sum() == len(encoded.features[0]["input_ids"])


def test_in_batch_logits_target_each_rows_partner_and_score_examples_alone():
    model = _tiny_biencoder(1, 16).eval()
    batch = _batch()
    out = model(**batch)
    assert out.logits.shape == (4, 4)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, torch.arange(4)).item())
    per_example = example_losses(model, batch)
    assert per_example.mean().item() == pytest.approx(out.loss.item(), rel=1e-5)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    assert hidden[-1].shape == (8, 6, 16)  # both towers stacked on the batch axis


def test_retrieval_metrics_rank_each_partner_among_all():
    left = torch.eye(4)
    assert retrieval_metrics(left, left) == {"recall_at_1": 1.0, "recall_at_5": 1.0, "mrr": 1.0}
    swapped = left[[1, 0, 2, 3]]  # pairs 0 and 1 retrieve each other's partner: rank 2
    metrics = retrieval_metrics(left, swapped)
    assert metrics["recall_at_1"] == 0.5 and metrics["mrr"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


def test_reverse_wrapper_mixes_the_small_models_kd_and_hidden_matching_into_the_wrapped_step():
    """The technique alone: a wrapped step on a fake batch, no loop."""
    from kdship.config import ReverseConfig
    from kdship.loop import StepInput, StepResult
    from kdship.techniques.reverse import HEAD
    from kdship.trainee import Forward, TrainedModule

    small, large = _tiny_biencoder(1, 16).eval(), _tiny_biencoder(2, 32).eval()  # eval: no dropout noise
    settings = ReverseConfig.model_validate({"from": "small", "steps": 4, "hidden_weight": 1.0})
    reverse = ReverseDistillation(small, large.config, settings)
    head = reverse.head(large.config)
    assert reverse.pairs == [(0, 0), (2, 1)] and head.maps[0].weight.shape == (16, 32)
    trained = TrainedModule(large, {HEAD: head})
    asked = []

    def step(x: StepInput) -> StepResult:
        asked.append(x.outputs)
        out, heads = trained(x.tensors, x.outputs)
        return StepResult(out.loss, {"loss": out.loss.detach()}, len(x.indices), {"model": Forward(out, heads)})

    wrapped = reverse.wrap(step)
    batch = _batch()
    mid = wrapped(StepInput(batch, [0, 1, 2, 3], step=2, progress=0.5))
    assert asked[-1] == {HEAD} and mid.logs["alpha"] == 0.5 and mid.logs["reverse_hidden"] > 0
    task = mid.logs["loss"]
    distill = mid.logs["reverse_kd"] + mid.logs["reverse_hidden"]
    assert mid.loss.item() == pytest.approx(0.5 * task.item() + 0.5 * distill.item(), rel=1e-5)
    mid.loss.backward()
    assert head.maps[1].weight.grad.abs().sum() > 0
    late = wrapped(StepInput(batch, [0, 1, 2, 3], step=4, progress=1.0))  # warm-up over: the plain step, unasked
    assert asked[-1] == frozenset() and "alpha" not in late.logs and late.loss.item() == pytest.approx(task.item())


def test_reverse_distillation_of_a_bi_encoder_with_resume(pairs, small_matcher, tmp_path):
    def args(out):
        return ["train", "--init", "bert:layers=3,hidden=48,heads=2,ffn=96,max_len=64", "--tokenizer",
                str(small_matcher), "--objective", "match", "--data", str(pairs / "train.tsv"), "--eval-data",
                str(pairs / "dev.tsv"), "--max-steps", "12", "--save-every", "6", "--batch-size", "16",
                "--reverse-from", str(small_matcher), "--reverse-steps", "8", "--reverse-hidden", "1", "-o", str(out)]

    kdship_ok(*args(tmp_path / "large"))
    record = json.loads((tmp_path / "large" / "kdship.json").read_text())
    assert record["reverse"]["layer_pairs"] == [[0, 0], [2, 1], [3, 2]]
    assert set(record["metrics"]) >= {"recall_at_1", "recall_at_5", "mrr"}
    # the folder is a bi-encoder again: same embeddings after reloading
    from test_reverse_selection import _interrupt_after_checkpoint

    _interrupt_after_checkpoint(args(tmp_path / "resumed"), tmp_path / ".resumed.kdship-run" / "checkpoint.pt")
    kdship_ok(*args(tmp_path / "resumed"), "--resume")
    tokenizer = load_tokenizer(str(small_matcher), "model")
    dev = tokenize(tokenizer, TextTable([("the plot was good", "the plot is good")], None, "mem", "x"), 64, None,
                   apart=True)
    a, b = (embed_pairs(build_model("match", str(tmp_path / d)), tokenizer, dev, 8, torch.device("cpu"))
            for d in ("large", "resumed"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_distill_a_bi_encoder_with_sample_selection(pairs, small_matcher, tmp_path):
    out = tmp_path / "student"
    kdship_ok("distill", "--teacher", small_matcher, "--student", "bert:layers=1", "--objective", "match",
              "--loss", "kd:0.5", "--loss", "ce:0.5", "--loss", "hidden_mse:1", "--data", pairs / "train.tsv",
              "--eval-data", pairs / "dev.tsv", "--max-steps", 10, "--batch-size", 8, "--select-by", small_matcher,
              "--select-ratio", "0.5", "-o", out)
    record = json.loads((out / "kdship.json").read_text())
    assert record["selection"]["candidates_per_step"] == 16 and record["selection"]["selected"] == 10 * 8
    assert record["selection"]["mean_value_selected"] > record["selection"]["mean_value_rejected"]
    assert "recall_at_1" in record["metrics"] and record["student"]["tensors_copied_from_teacher"] > 0
    kdship_ok("eval", "--teacher", small_matcher, "--student", out, "--data", pairs / "dev.tsv")
    report = json.loads((out / "eval.json").read_text())
    assert report["student"]["recall_at_1"] == pytest.approx(record["metrics"]["recall_at_1"])
    assert report["comparison"]["retention"] == pytest.approx(
        report["student"]["recall_at_1"] / report["teacher"]["recall_at_1"])
    assert 0 < report["comparison"]["agreement"] <= 1
    for command in (["export", out, "-o", tmp_path / "art"], ["bench", out, "--backend", "torch", "--seq", "16"]):
        result = kdship(*command)
        assert result.exit_code == 2 and "dual-tower (match) model" in result.stderr and not (tmp_path / "art").exists()
    # report and gate read retrieval evaluations: recall@1 is their headline
    kdship_ok("report", out, "-o", tmp_path / "report.html")
    assert "recall_at_1" in (tmp_path / "report.md").read_text()
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("min_recall_at_1: 0.01\nmin_retention: 0.5\n")
    kdship_ok("gate", out, "--budgets", budgets)
    budgets.write_text("min_accuracy: 0.5\n")
    wrong = kdship("gate", out, "--budgets", budgets)
    assert wrong.exit_code == 2 and "measures recall_at_1; use min_recall_at_1" in wrong.stderr


def test_pair_classification_train_and_distill_with_cached_teacher(pairs, small_matcher, tmp_path):
    data = ["--data", str(pairs / "labelled.tsv"), "--eval-data", str(pairs / "labelled_dev.tsv")]
    kdship_ok("train", "--model", small_matcher, "--objective", "match", "--match-loss", "classify", *data,
              "--max-steps", 30, "--batch-size", 16, "--lr", "2e-3", "-o", tmp_path / "teacher")
    teacher = json.loads((tmp_path / "teacher" / "kdship.json").read_text())
    assert teacher["metrics"]["accuracy"] > 0.5
    kdship_ok("distill", "--teacher", tmp_path / "teacher", "--student", "bert:layers=1", "--objective", "match",
              "--match-loss", "classify", *data, "--max-steps", 10, "--select-by", tmp_path / "teacher",
              "--select-mode", "weighted", "-o", tmp_path / "student")
    record = json.loads((tmp_path / "student" / "kdship.json").read_text())
    assert record["training"]["teacher_cache"] and record["training"]["teacher_forward_calls"] == 0
    assert {"accuracy", "agreement"} <= set(record["metrics"])
    kdship_ok("eval", "--teacher", tmp_path / "teacher", "--student", tmp_path / "student", "--data",
              pairs / "labelled_dev.tsv")
    report = json.loads((tmp_path / "student" / "eval.json").read_text())
    assert report["student"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert report["comparison"]["agreement"] == pytest.approx(record["metrics"]["agreement"])
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["kdship_biencoder"]["label_names"] == ["different", "paraphrase"]
    mixed = kdship("eval", "--teacher", small_matcher, "--student", tmp_path / "student", "--data",
                   pairs / "labelled_dev.tsv")
    assert mixed.exit_code == 2 and "not the same kind of model" in mixed.stderr
    # back to in-batch matching from the pair classifier: its head is dropped, the encoder trains on
    kdship_ok("train", "--model", tmp_path / "teacher", "--objective", "match", "--data", pairs / "train.tsv",
              "--eval-data", pairs / "dev.tsv", "--max-steps", 2, "--select-by", tmp_path / "teacher",
              "--reverse-from", tmp_path / "teacher", "--reverse-steps", 2, "-o", tmp_path / "in-batch")
    config = json.loads((tmp_path / "in-batch" / "config.json").read_text())
    assert config["kdship_biencoder"]["label_names"] is None
    assert not (tmp_path / "in-batch" / "biencoder_head.safetensors").exists()
    kdship_ok("eval", "--teacher", tmp_path / "teacher", "--student", tmp_path / "in-batch", "--data",
              pairs / "dev.tsv")  # an in-batch student's teacher may be any encoder


def test_a_classifier_made_from_a_bi_encoder_is_a_plain_classifier(small_matcher, data_dir, tmp_path):
    kdship_ok("train", "--model", small_matcher, "--data", data_dir / "train.tsv", "--max-steps", 2,
              "-o", tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert "kdship_biencoder" not in config and config["architectures"] == ["BertForSequenceClassification"]


def test_match_and_selection_bad_inputs(pairs, small_matcher, data_dir, teacher_dir, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["train", "--init", TINY, "--objective", "match", "--data", data_dir / "train.tsv"],
         "needs sentence pairs"),
        (["distill", "--teacher", small_matcher, "--student", "bert:layers=1", "--objective", "features", "--loss",
          "hidden_mse", "--data", pairs / "train.tsv", "--select-by", small_matcher], "objective features"),
        (["distill", "--teacher", small_matcher, "--students", "1L32,2L32", "--objective", "match", "--data",
          pairs / "train.tsv", "--select-by", small_matcher], "several students"),
        (["train", "--model", small_matcher, "--objective", "match", "--match-loss", "classify", "--data",
          pairs / "labelled.tsv", "--select-by", small_matcher], "not a pair-classifying bi-encoder"),
        (["distill", "--teacher", small_matcher, "--student", "bert:layers=1", "--objective", "match",
          "--match-loss", "classify", "--data", pairs / "labelled.tsv"], "not a bi-encoder trained to classify"),
        (["train", "--model", small_matcher, "--objective", "match", "--data", pairs / "train.tsv",
          "--select-by", teacher_dir], "different tokenizer"),
        (["train", "--model", small_matcher, "--objective", "match", "--data", pairs / "train.tsv",
          "--select-by", small_matcher, "--select-refresh", 3], "selection.refresh > 1 cannot be used with in-batch"),
        (["train", "--model", small_matcher, "--match-loss", "classify", "--data", data_dir / "train.tsv"],
         "match_loss applies to objective match only"),
        (["train", "--model", small_matcher, "--objective", "match", "--data", pairs / "train.tsv",
          "--reverse-hidden", 1], "reverse.from (--reverse-from) is required once any reverse setting is given"),
    ]
    for args, message in cases:
        result = kdship(*args, "--max-steps", 2, "-o", out)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert not out.exists()
