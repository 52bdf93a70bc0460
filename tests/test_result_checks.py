"""The causes of collapsed students, each pinned by a test that failed before its fix, and collapse caught where it
appears: the warning after an evaluation, the record, `kdship gate`, and a pipeline that stops at a collapsed stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from conftest import kdship, kdship_ok
from test_progressive import _recipe, teachers  # noqa: F401 (a fixture)

from kdship.losses import attention_kl, hidden_mse, hidden_mse_normalised, qkv_relation_kl
from kdship.sanity import Baseline, findings
from kdship.trainee import ATTENTIONS, QKV, TrainedModule


def _tiny_bert(**kw) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                        vocab_size=100, attn_implementation="eager", **kw)
    return BertModel(config)


def test_attention_maps_read_in_training_are_the_probabilities_not_their_dropped_out_copy():
    """The cause of attention_kl stuck at 2.7-3.0: in train mode a model returns its attention maps after dropout
    (a tenth of the entries 0, the rest / 0.9), so even a student identical to its teacher scored ~2.8."""
    model = _tiny_bert(hidden_dropout_prob=0.0)  # attention dropout only
    inputs = {"input_ids": torch.randint(0, 100, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        teacher_maps = model(**inputs, output_attentions=True).attentions
    model.train()
    out, _ = TrainedModule(model, {})(inputs, frozenset({ATTENTIONS}))
    assert all(torch.allclose(a.sum(-1), torch.ones(())) and (a > 0).all() for a in out.attentions)
    assert attention_kl(out.attentions, teacher_maps).item() == pytest.approx(0.0, abs=1e-5)
    assert model.encoder.layer[0].attention.self.dropout.p == pytest.approx(0.1)  # put back after the forward


def test_normalised_hidden_mse_does_not_depend_on_the_teachers_activation_magnitudes():
    torch.manual_seed(0)
    teacher = torch.randn(3, 7, 16)
    student = teacher + 0.3 * torch.randn(3, 7, 16)
    outliers = torch.ones(16)
    outliers[:2] = 50.0  # two outlier dimensions, as pretrained encoders have
    mask = torch.ones(3, 7)
    mask[0, 5:] = 0
    plain = hidden_mse_normalised([student], [teacher], mask)
    scaled = hidden_mse_normalised([student * outliers], [teacher * outliers], mask)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-4)
    assert hidden_mse([student * outliers], [teacher * outliers], mask) > 100 * hidden_mse([student], [teacher], mask)
    mean_state = teacher[mask.bool()].mean(0).expand_as(teacher)  # predicting the mean scores 1
    assert hidden_mse_normalised([mean_state], [teacher], mask).item() == pytest.approx(1.0, rel=1e-4)


def test_qkv_relations_are_zero_on_identical_states_and_compare_different_widths():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 6, 24) for _ in range(3)]
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    assert qkv_relation_kl(teacher, teacher, 4, mask).item() == pytest.approx(0.0, abs=1e-6)
    narrower = [torch.randn(2, 6, 12) for _ in range(3)]
    assert qkv_relation_kl(narrower, teacher, 4, mask).item() > 0.01
    changed = [t.clone() for t in teacher]
    for t in changed:
        t[1, 4:] = 100.0  # padding never counts, as key or as query
    assert qkv_relation_kl(changed, teacher, 4, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_the_students_qkv_are_captured_from_its_last_layer():
    model = _tiny_bert()
    out, heads = TrainedModule(model, {})({"input_ids": torch.randint(0, 100, (2, 5))}, frozenset({QKV}))
    q, k, v = heads[QKV]
    assert q.shape == k.shape == v.shape == (2, 5, 32)
    assert q.requires_grad and not model.encoder.layer[-1].attention.self.query._forward_hooks


def test_relation_distillation_runs_and_its_loss_falls(teacher_dir, data_dir, tmp_path):
    kdship_ok("distill", "--teacher", teacher_dir, "--student", "bert:layers=1,hidden=24,heads=2,ffn=48",
              "--data", data_dir / "train.tsv", "--loss", "qkv_relations:1", "--loss", "hidden_mse:1",
              "--max-steps", 30, "--batch-size", 16, "--lr", "3e-3", "-o", tmp_path / "minilmv2")
    training = json.loads((tmp_path / "minilmv2" / "kdship.json").read_text())["training"]
    assert training["loss_last"] < 0.8 * training["loss_first"]


def test_hard_labels_alone_neither_run_nor_cache_the_teacher(teacher_dir, data_dir, tmp_path, monkeypatch):
    import kdship.distill

    loaded = []
    build = kdship.distill.build_model
    monkeypatch.setattr(kdship.distill, "build_model", lambda *a, **kw: loaded.append(kw.get("source")) or build(*a, **kw))
    result = kdship_ok("distill", "--teacher", teacher_dir, "--student", "bert:layers=1,hidden=16,heads=2,ffn=32",
                       "--data", data_dir / "train.tsv", "--loss", "ce:1", "--max-steps", 4, "--batch-size", 16,
                       "-o", tmp_path / "hard")
    training = json.loads((tmp_path / "hard" / "kdship.json").read_text())["training"]
    assert training["teacher_read"] is False and training["teacher_cache"] is False
    assert training["teacher_forward_calls"] == 0 and "teacher cached" not in result.output
    assert str(teacher_dir) not in map(str, loaded)  # a random student of its own width: the teacher not even loaded


def test_findings_name_the_majority_class_and_a_single_answer():
    baseline = Baseline.of([0, 0, 0, 1], ["neg", "pos"])
    assert baseline.majority_rate == 0.75 and baseline.majority_label == "neg" and baseline.chance == 0.5
    found = findings({"accuracy": 0.75, "agreement": 0.7, "top_prediction_share": 1.0}, baseline)
    assert len(found) == 3 and "75.0%" in found[0] and "'neg'" in found[0]
    assert findings({"accuracy": 0.9, "agreement": 0.9, "top_prediction_share": 0.8}, baseline) == []


def _collapsed_student(teacher_dir: Path, out: Path) -> Path:
    """The teacher with its classifier answering class 0 whatever the input."""
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([20.0, -20.0]))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def test_a_collapsed_student_is_warned_about_marked_and_failed_by_the_gate(teacher_dir, data_dir, tmp_path):
    student = _collapsed_student(teacher_dir, tmp_path / "collapsed")
    result = kdship_ok("distill", "--teacher", teacher_dir, "--student", student, "--data", data_dir / "train.tsv",
                       "--eval-data", data_dir / "dev.tsv", "--loss", "ce:1", "--lr", "1e-9", "--max-steps", 2,
                       "--batch-size", 16, "-o", tmp_path / "still-collapsed")
    assert "looks collapsed" in result.output and "majority-class rate" in result.output
    record = json.loads((tmp_path / "still-collapsed" / "kdship.json").read_text())
    assert record["checks"]["collapsed"] and record["metrics"]["top_prediction_share"] == 1.0
    eval_result = kdship_ok("eval", "--student", tmp_path / "still-collapsed", "--teacher", teacher_dir,
                            "--data", data_dir / "dev.tsv")
    assert "looks collapsed" in eval_result.output
    assert json.loads((tmp_path / "still-collapsed" / "eval.json").read_text())["checks"]["collapsed"]
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("min_accuracy: 0.0\n")
    gated = kdship("gate", tmp_path / "still-collapsed", "--budgets", budgets)
    assert gated.exit_code == 1
    assert "✗ still-collapsed not collapsed" in gated.output and "✓ student accuracy" in gated.output
    # one line per folder (kdship eval's verdict over the record's), showing the accuracy it judged
    lines = [line for line in gated.output.splitlines() if "not collapsed" in line and not line.startswith("error")]
    accuracy = json.loads((tmp_path / "still-collapsed" / "eval.json").read_text())["student"]["accuracy"]
    assert len(lines) == 1 and f": {accuracy:g} (limit >" in lines[0], lines


def test_a_healthy_student_is_not_marked(teacher_dir, data_dir, tmp_path):
    kdship_ok("eval", "--student", teacher_dir, "--teacher", teacher_dir, "--data", data_dir / "dev.tsv",
              "-o", tmp_path / "eval.json")
    checks = json.loads((tmp_path / "eval.json").read_text())["checks"]
    assert checks["collapsed"] is False and checks["notes"] == []


def test_a_pipeline_stops_at_a_collapsed_stage_unless_told_to_keep_going(teachers, data_dir, tmp_path):
    student = _collapsed_student(teachers / "finetuned", tmp_path / "collapsed")
    stages = """
  - {name: first, teacher: finetuned, data: task, objective: classify, losses: [{name: ce}], lr: 1.0e-9}
  - {name: second, teacher: finetuned, data: task, objective: classify, losses: [{name: kd}]}
"""
    recipe = _recipe(tmp_path, teachers, data_dir, stages)
    stopped = kdship("distill", "--recipe", recipe, "--student", student, "-o", tmp_path / "stopped")
    assert stopped.exit_code == 1 and "stage 'first' ended with a collapsed student" in stopped.output
    assert not (tmp_path / "stopped" / "student").exists()
    kdship_ok("distill", "--recipe", recipe, "--student", student, "--keep-going", "-o", tmp_path / "kept")
    assert (tmp_path / "kept" / "student" / "kdship.json").exists()
    single = kdship("distill", "--teacher", teachers / "finetuned", "--student", student, "--keep-going",
                    "--data", data_dir / "train.tsv", "-o", tmp_path / "single")
    assert single.exit_code == 2 and "--keep-going is for pipeline recipes" in single.output


def test_a_dimension_the_teacher_holds_constant_does_not_outweigh_the_others():
    """Fine-tuned sentence encoders have dimensions of variance ~1e-7; an offset there is a constant the projection's
    bias learns, and must not weigh like a whole layer's error (at a 1e-3 floor it weighed 100x this bound)."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 16)
    teacher[..., 0] = 0.5 + 1e-4 * torch.randn(2, 8)
    student = teacher.clone()
    student[..., 0] += 0.1
    loss = hidden_mse_normalised([student], [teacher], torch.ones(2, 8))
    assert loss.item() < 0.01  # 0.1² / (a tenth of the median variance ~1) / 16 dimensions = 0.006


def test_learning_rate_default_follows_how_the_student_starts(teacher_dir, data_dir, tmp_path):
    """A randomly initialised student gets 5e-4 (at 1e-4 task KD sits ~130 steps at the majority class), one with
    the teacher's layers 1e-4, and each keeps its origin's rate when a later run (a pipeline's next stage) continues
    it; a model kdship did not distil counts as pretrained; --lr sets both; the optimizer really uses it."""
    import json

    from conftest import kdship_ok

    def lr_of(out, student, *extra):
        kdship_ok("distill", "--teacher", teacher_dir, "--student", student, "--data", data_dir / "train.tsv",
                  "--max-steps", 2, "--batch-size", 8, "-o", tmp_path / out, *extra)
        return json.loads((tmp_path / out / "kdship.json").read_text())["student"]["lr"]

    assert lr_of("random", "bert:layers=1,hidden=48,heads=2,ffn=96") == 5e-4
    assert lr_of("copied", "bert:layers=1") == 1e-4
    assert lr_of("random-continued", tmp_path / "random") == 5e-4
    assert lr_of("copied-continued", tmp_path / "copied") == 1e-4
    assert lr_of("pretrained", teacher_dir) == 1e-4
    assert lr_of("given", "bert:layers=1,hidden=48,heads=2,ffn=96", "--lr", "3e-5") == 3e-5


def test_each_trainee_gets_its_own_learning_rate_in_the_optimizer():
    from torch import nn

    from kdship.config import TrainConfig
    from kdship.loop import _optimizer
    from kdship.trainee import Trainee

    a, b = Trainee("a", nn.Linear(2, 2), lr=5e-4), Trainee("b", nn.Linear(2, 2))
    for t in (a, b):
        t.module = t.model
    optimizer = _optimizer(TrainConfig(init="bert:layers=1", lr=2e-5), [a, b])
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4, 2e-5, 2e-5]
