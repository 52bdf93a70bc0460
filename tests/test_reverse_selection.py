"""Reverse distillation and sample-value selection: schedules, exact selection, end-to-end runs with resume,
and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import kdship, kdship_ok
from kdship.techniques.reverse import reverse_alpha
from kdship.techniques.selection import Selector, per_example_loss, select_topk, select_weighted


@pytest.mark.parametrize("schedule, expected", [
    ("linear", [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    ("cosine", [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0]),
    ("step", [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
])
def test_reverse_alpha_schedules(schedule, expected):
    assert [reverse_alpha(s, 4, schedule) for s in range(6)] == pytest.approx(expected)
    assert reverse_alpha(0, 4, schedule, start=0.5) == pytest.approx(0.5)


def test_select_topk_picks_exactly_the_highest_values():
    values = torch.tensor([0.1, 2.0, -1.0, 0.7, 3.5, 0.0])
    assert select_topk(values, 0.5).tolist() == [4, 1, 3]
    assert select_topk(values, 0.01).tolist() == [4]  # at least one
    assert sorted(select_topk(values, 1.0).tolist()) == list(range(6))


def test_select_weighted_draws_the_ratio_without_repeats_favouring_high_values():
    values = torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0, 4.0, 4.0, 4.0])
    draw = lambda seed: select_weighted(values, 0.5, torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(3).tolist() == draw(3).tolist()  # seeded: a resumed run draws the same rows
    picks = [draw(seed).tolist() for seed in range(200)]
    assert all(len(p) == 4 == len(set(p)) for p in picks)
    high = sum(i >= 4 for p in picks for i in p) / (4 * len(picks))
    assert 0.9 < high < 1.0  # e^4 times likelier, yet the low-value samples keep a chance


def test_per_example_loss_for_classification_and_mlm():
    logits = torch.randn(3, 4)
    labels = torch.tensor([0, 3, 1])
    assert per_example_loss(logits, labels).tolist() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist())
    mlm_logits = torch.randn(2, 5, 7)
    mlm_labels = torch.full((2, 5), -100)
    mlm_labels[0, 1], mlm_labels[1, 3] = 2, 6
    expected = [torch.nn.functional.cross_entropy(mlm_logits[0, 1:2], mlm_labels[0, 1:2]).item(),
                torch.nn.functional.cross_entropy(mlm_logits[1, 3:4], mlm_labels[1, 3:4]).item()]
    assert per_example_loss(mlm_logits, mlm_labels).tolist() == pytest.approx(expected)


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given per input id: the loss of each example is known exactly."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": self.table[input_ids[:, 0]]})()


def test_selector_trains_on_the_samples_the_small_model_knows_and_the_large_does_not():
    labels = torch.tensor([0, 0, 0, 0])
    confident, unsure = torch.tensor([5.0, -5.0]), torch.tensor([0.0, 0.0])
    large = Fixed(torch.stack([unsure, unsure, confident, confident]))  # large unsure about examples 0 and 1
    small = Fixed(torch.stack([confident, unsure, confident, unsure]))  # small knows 0 and 2
    batch = {"input_ids": torch.tensor([[0], [1], [2], [3]]), "labels": labels}
    selector = Selector(small, large, ratio=0.25, mode="topk", refresh=1, n_examples=4, small_losses=None)
    assert selector.choose(batch, [0, 1, 2, 3], step=0).tolist() == [0]  # large wrong, small right: most valuable
    assert selector.summary()["selected"] == 1 and selector.summary()["candidates"] == 4
    assert selector.last["value_kept"] > selector.last["value_dropped"]  # shown on the progress line


@pytest.fixture(scope="module")
def small_model(data_dir, teacher_dir, tmp_path_factory):
    """A 1-layer classifier with the tiny teacher's tokenizer and labels (the 'small' model)."""
    out = tmp_path_factory.mktemp("small") / "small"
    kdship_ok("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data", data_dir / "train.tsv",
              "--max-steps", 20, "--batch-size", 16, "--lr", "1e-3", "-o", out)
    return out


def _large_args(data_dir, teacher_dir, out, *extra):
    return ["train", "--init", "bert:layers=2,hidden=48,heads=2,ffn=96,max_len=64", "--tokenizer", str(teacher_dir),
            "--data", str(data_dir / "train.tsv"), "--eval-data", str(data_dir / "dev.tsv"), "--batch-size", "8",
            "--max-steps", "12", "--save-every", "4", "-o", str(out), *extra]


def test_reverse_distillation_end_to_end_with_resume(data_dir, teacher_dir, small_model, tmp_path):
    extra = ["--reverse-from", str(small_model), "--reverse-steps", "6", "--reverse-schedule", "cosine",
             "--reverse-hidden", "0.5"]
    kdship_ok(*_large_args(data_dir, teacher_dir, tmp_path / "large", *extra))
    record = json.loads((tmp_path / "large" / "kdship.json").read_text())
    # hidden matching: the small model's embeddings and 1 layer against the large one's embeddings and layer 2
    assert record["reverse"] == {"from": str(small_model), "steps": 6, "schedule": "cosine", "temperature": 2.0,
                                 "start": 1.0, "hidden_weight": 0.5, "layer_pairs": [[0, 0], [2, 1]]}
    assert "projections" not in (tmp_path / "large" / "model.safetensors").read_bytes().decode("latin-1")
    assert record["training"]["steps"] == 12 and "accuracy" in record["metrics"]
    # resume: a run stopped at a checkpoint (step 8) reaches the same weights as the straight one
    stopped = _large_args(data_dir, teacher_dir, tmp_path / "resumed", *extra)
    stopped[stopped.index("--max-steps") + 1] = "12"
    _interrupt_after_checkpoint(stopped, tmp_path / ".resumed.kdship-run" / "checkpoint.pt")
    kdship_ok(*stopped, "--resume")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("large", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _interrupt_after_checkpoint(args, checkpoint):
    """Run the CLI in-process and stop it (KeyboardInterrupt) right after its first checkpoint is written."""
    import kdship.loop as loop

    original = loop.Checkpointer.save

    def save_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise KeyboardInterrupt

    loop.Checkpointer.save = save_then_stop
    try:
        result = kdship(*args)
    finally:
        loop.Checkpointer.save = original
    assert result.exit_code == 130 and checkpoint.exists()


def test_sample_value_selection_end_to_end(data_dir, teacher_dir, small_model, tmp_path):
    extra = ["--select-by", str(small_model), "--select-ratio", "0.5", "--select-mode", "topk"]
    kdship_ok(*_large_args(data_dir, teacher_dir, tmp_path / "selected", *extra))
    record = json.loads((tmp_path / "selected" / "kdship.json").read_text())
    selection = record["selection"]
    assert selection["candidates_per_step"] == 16 and selection["candidates"] == 12 * 16
    assert selection["selected"] == 12 * 8 == record["training"]["samples_seen"]  # scored candidates are not trained
    assert selection["mean_value_selected"] > selection["mean_value_rejected"]

    def weighted_args(out):
        args = _large_args(data_dir, teacher_dir, out, "--select-by", str(small_model), "--select-mode", "weighted",
                           "--select-refresh", "100")
        args[args.index("--max-steps") + 1] = "40"  # 25 steps an epoch: the second epoch reuses the first's scores
        return args

    kdship_ok(*weighted_args(tmp_path / "weighted"))
    weighted = json.loads((tmp_path / "weighted" / "kdship.json").read_text())["selection"]
    assert weighted["candidates"] == 40 * 16 and weighted["selected"] == 40 * 8
    assert weighted["large_scoring_rows"] == 400  # every example scored once, then reused within 100 steps
    # scores and counts are checkpointed: a run resumed at step 4 selects what the straight one did
    _interrupt_after_checkpoint(weighted_args(tmp_path / "resumed"), tmp_path / ".resumed.kdship-run" / "checkpoint.pt")
    kdship_ok(*weighted_args(tmp_path / "resumed"), "--resume")
    assert json.loads((tmp_path / "resumed" / "kdship.json").read_text())["selection"] == weighted
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("weighted", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_selection_while_fine_tuning_a_bare_encoder(data_dir, teacher_dir, small_model, tmp_path):
    """A pretrained encoder without a classifier head (as sentence-transformers ship them) gets its head from the
    data's labels; the scoring model's labels are compared with those, not with the head it did not have."""
    from transformers import AutoModel, AutoTokenizer

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(teacher_dir).save_pretrained(bare)  # architectures: BertModel
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(bare)
    kdship_ok("train", "--model", bare, "--data", data_dir / "train.tsv", "--batch-size", 8, "--max-steps", 4,
              "--select-by", small_model, "-o", tmp_path / "selected")
    assert json.loads((tmp_path / "selected" / "kdship.json").read_text())["selection"]["selected"] == 4 * 8


def test_reverse_and_selection_bad_inputs(data_dir, teacher_dir, small_model, tmp_path):
    other = tmp_path / "other-vocab"
    corpus = tmp_path / "other.tsv"
    corpus.write_text("sentence\tlabel\n" + "".join(f"zebra{i} quokka{i}\t{i % 2}\n" for i in range(40)))
    kdship_ok("train", "--init", "bert:layers=1,hidden=32,heads=2", "--data", corpus, "--max-steps", 1, "-o", other)
    out = tmp_path / "large"
    for extra, message in [
        (["--reverse-from", str(other), "--reverse-steps", "2"], "different tokenizer"),
        (["--select-by", str(small_model), "--select-ratio", "1.5"], "selection.ratio: Input should be less than "
                                                                     "or equal to 1"),
        (["--select-by", str(small_model), "--select-ratio", "0"], "selection.ratio: Input should be greater than 0"),
        (["--reverse-from", str(small_model), "--reverse-steps", "50"], "reverse.steps 50 is longer than the run"),
        (["--select-by", str(tmp_path / "missing")], "not found"),
        (["--reverse-steps", "3"], "reverse.from (--reverse-from) is required once any reverse setting is given"),
    ]:
        result = kdship(*_large_args(data_dir, teacher_dir, out, *extra))
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert not out.exists()


def test_selection_wrapper_hands_the_step_only_the_chosen_rows():
    """The technique alone: a wrapped step on a fake batch, no loop."""
    from kdship.config import SelectionConfig
    from kdship.loop import StepInput, StepResult
    from kdship.techniques.selection import SampleSelection

    confident, unsure = torch.tensor([5.0, -5.0]), torch.tensor([0.0, 0.0])
    large = Fixed(torch.stack([unsure, confident, unsure, confident]))
    small = Fixed(torch.stack([confident, confident, confident, unsure]))
    selector = Selector(small, large, ratio=0.5, mode="topk", refresh=1, n_examples=4, small_losses=None)
    technique = SampleSelection(selector, SelectionConfig(by="small", ratio=0.5), candidates=4)
    seen = []

    def step(x: StepInput) -> StepResult:
        seen.append((x.indices, x.tensors["labels"].tolist()))
        return StepResult(torch.tensor(1.0), {"loss": 1.0}, len(x.indices))

    batch = {"input_ids": torch.tensor([[0], [1], [2], [3]]), "labels": torch.tensor([0, 0, 0, 0])}
    result = technique.wrap(step)(StepInput(batch, [0, 1, 2, 3], step=0, progress=0.0))
    assert sorted(seen[0][0]) == [0, 2]  # the two the large model is unsure of and the small one knows
    assert result.samples == 2 and result.logs["loss"] == 1.0 and "value_kept" in result.logs
    assert technique.memory()["selection"] is selector.memory  # what a checkpoint keeps of it


def test_a_planted_pickle_in_the_checkpoint_is_refused_without_running(data_dir, teacher_dir, tmp_path):
    """--resume loads the checkpoint with weights_only=True: a pickle that would run code is one line, exit 2."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    run_dir = tmp_path / ".large.kdship-run"
    run_dir.mkdir()
    torch.save({"format": "kdship-checkpoint/2", "x": Payload()}, run_dir / "checkpoint.pt")
    result = kdship(*_large_args(data_dir, teacher_dir, tmp_path / "large"), "--resume")
    assert result.exit_code == 2 and not marker.exists(), result.output
    assert result.stderr.count("\n") == 1 and "not a kdship checkpoint that can be loaded safely" in result.stderr


@pytest.mark.parametrize("content", ["format only", "entries of the wrong kind", "not a pickle"])
def test_a_checkpoint_that_is_not_kdships_is_one_line(data_dir, teacher_dir, tmp_path, content):
    run_dir = tmp_path / ".large.kdship-run"
    run_dir.mkdir()
    path = run_dir / "checkpoint.pt"
    if content == "not a pickle":
        path.write_bytes(b"PK\x03\x04 not a checkpoint at all")
    else:
        extra = {"config": [1, 2], "processes": "two"} if content == "entries of the wrong kind" else {}
        torch.save({"format": "kdship-checkpoint/2", **extra}, path)
    result = kdship(*_large_args(data_dir, teacher_dir, tmp_path / "large"), "--resume")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.count("\n") == 1 and "pass --overwrite to start again" in result.stderr, result.stderr

