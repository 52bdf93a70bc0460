"""The distillation families beyond soft/hard labels: each runs end to end on tiny models, resumes where it keeps
state, visibly acts (curriculum's first steps see only the easy samples, the EMA teacher's weights trail the
student's, early exit at threshold 0 stops at the first exit), and refuses what it cannot do in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEACHER, kdship, kdship_ok
from test_progressive import teachers  # noqa: F401 (a fixture: generic masked-LM and fine-tuned teachers)
from test_reverse_selection import _interrupt_after_checkpoint


def record(folder: Path) -> dict:
    return json.loads((folder / "kdship.json").read_text())


def _distill(teacher_dir, data_dir, out, *extra, steps=8):
    return ["distill", "--teacher", teacher_dir, "--student", "bert:layers=2", "--data", data_dir / "train.tsv",
            "--eval-data", data_dir / "dev.tsv", "--max-steps", steps, "--batch-size", 16, "--eval-every", 4,
            "-o", out, *extra]


@pytest.fixture(scope="module")
def second_teacher(data_dir, teacher_dir, tmp_path_factory) -> Path:
    """Another teacher of the same task and tokenizer (the first one fine-tuned further, another seed)."""
    out = tmp_path_factory.mktemp("second") / "teacher2"
    kdship_ok("train", "--model", teacher_dir, "--data", data_dir / "train.tsv", "--max-steps", 20, "--batch-size", 16,
              "--lr", "1e-3", "--seed", 7, "-o", out)
    return out


@pytest.fixture(scope="module")
def three_classes(data_dir, tmp_path_factory) -> Path:
    """The task's sentences with another label set (3 classes by sentence length): a related task."""
    root = tmp_path_factory.mktemp("three")
    for split in ("train", "dev"):
        lines = (data_dir / f"{split}.tsv").read_text().splitlines()
        rows = [line.split("\t")[0] for line in lines[1:]]
        labeled = [f"{t}\t{('short', 'medium', 'long')[min(max(len(t.split()) - 4, 0), 2)]}" for t in rows]
        (root / f"{split}.tsv").write_text("\n".join(["sentence\tlabel", *labeled]) + "\n")
    return root


# ---- self-distillation with early exits -------------------------------------------------------------------------


def _tiny_early_exit_model(layers: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    from kdship.early_exit import with_exit_heads

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return with_exit_heads(BertForSequenceClassification(config), list(range(1, layers))).eval()


def test_exit_at_threshold_zero_stops_at_the_first_exit_and_above_one_never():
    from kdship.early_exit import exit_curve, predict_with_exits

    model = _tiny_early_exit_model()
    inputs = {"input_ids": torch.randint(5, 100, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    seen = []
    hook = model.model.bert.encoder.layer[1].register_forward_hook(lambda *a: seen.append(1))
    logits, layers = predict_with_exits(model, inputs, threshold=0.0)
    assert layers.tolist() == [1, 1, 1, 1] and not seen  # every row stopped at layer 1: layer 2 never ran
    assert torch.allclose(logits, model(**inputs).exit_logits[0])
    logits, layers = predict_with_exits(model, inputs, threshold=1.01)
    hook.remove()
    assert layers.tolist() == [3] * 4 and torch.allclose(logits, model(**inputs).logits)
    curve = exit_curve(model, [inputs], torch.zeros(4, dtype=torch.long), [0.0, 1.01])
    assert [p["mean_exit_layer"] for p in curve["curve"]] == [1.0, 3.0]  # the curve agrees with the runner


def _exit_parity_fails_on_exits_that_disagree(artifact, onnx_file):
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer
    from kdship.exporters import build_order
    from kdship.exporters.onnx_export import input_names_for
    from kdship.exporters.parity import batched, check_exits

    tokenizer = AutoTokenizer.from_pretrained(artifact)
    names = input_names_for(tokenizer, AutoConfig.from_pretrained(artifact))
    batches = batched(tokenizer, [("a fine film",), ("a dull film",), ("it was long",)], names, 16)
    got = ort.InferenceSession(str(artifact / onnx_file)).run(["exit_logits"], batches[0])[0]
    onnx = build_order(["onnx"])[0]
    assert check_exits(onnx, artifact / onnx_file, {"case": batches[0]}, {"case": got}, batches, got)["passed"]
    flipped = -got  # two labels: every exit's pick flips
    assert not check_exits(onnx, artifact / onnx_file, {"case": batches[0]}, {"case": flipped}, batches, flipped)["passed"]


def test_early_exit_distillation_export_bench_serve_and_gate(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "student"
    kdship_ok(*_distill(teacher_dir, data_dir, out, "--exits", "1"))
    assert (out / "exit_heads.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["kdship_early_exit"] == {"layers": [1]}
    assert record(out)["early_exit"]["exit_layers"] == {"student": [1]}
    kdship_ok("eval", out, "--data", data_dir / "dev.tsv", "--exit-threshold", "0,1.01")
    curve = json.loads((out / "eval.json").read_text())["student"]["early_exit"]["curve"]
    assert [p["mean_exit_layer"] for p in curve] == [1.0, 2.0]
    # the exported graphs return every exit's logits, checked against PyTorch
    kdship_ok("export", out, "--to", "onnx,int8", "-o", tmp_path / "artifact")
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert set(manifest["variants"]["onnx"]["outputs"]) == {"logits", "exit_logits"}
    assert manifest["variants"]["onnx"]["parity"]["exits"]["passed"]
    int8 = manifest["variants"]["int8"]["parity"]
    assert int8["exits"]["eval_n"] == int8["eval_n"] > 100  # pooled over the eval rows, as the final logits are
    _exit_parity_fails_on_exits_that_disagree(tmp_path / "artifact", manifest["variants"]["onnx"]["file"])
    kdship_ok("deploy", "triton", tmp_path / "artifact", "--variant", "onnx", "-o", tmp_path / "triton")
    assert 'name: "exit_logits"' in (tmp_path / "triton" / "artifact_model" / "config.pbtxt").read_text()
    # bench: rows at each threshold on the torch backend, and the accuracy there
    kdship_ok("bench", out, "--backend", "torch", "--batch", "1", "--seq", "16", "--exit-threshold", "0,1.01",
              "--max-seconds", "1", "--min-runs", "3", "-o", tmp_path / "bench")
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["model"]: r for r in bench["results"]}
    assert set(rows) == {"student", "student@exit0", "student@exit1.01"}
    assert rows["student@exit0"]["exit_distribution"] == {"1": 1.0}
    assert [p["threshold"] for p in bench["early_exit"]["student"]["curve"]] == [0.0, 1.01]
    refused = kdship("bench", tmp_path / "artifact", "--exit-threshold", "0.9", "--batch", "1", "--seq", "8")
    assert refused.exit_code == 2 and "need --backend torch alone" in refused.stderr
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("early_exit: [{threshold: 0, min_layers_saved: 0.5}, {threshold: 1.01, min_accuracy: 0.99}]\n")
    gated = kdship("gate", tmp_path / "bench", "--budgets", budgets)
    assert gated.exit_code == 1 and "✓ student exit@0 layers_saved" in gated.output
    assert "✗ student exit@1.01 accuracy" in gated.output


def test_served_early_exit_says_where_each_text_stopped(teacher_dir, data_dir, tmp_path):
    from fastapi.testclient import TestClient

    from kdship.config import ServeConfig
    from kdship.serve.app import create_app
    from kdship.serve.model import load_served_model

    out = tmp_path / "student"
    kdship_ok(*_distill(teacher_dir, data_dir, out, "--exits", "all", steps=4))
    cfg = ServeConfig(artifact=str(out), backend="torch", batching=False, exit_threshold=0.0)
    app = create_app(load_served_model(out, "torch", exit_threshold=0.0), cfg)
    with TestClient(app) as client:
        predictions = client.post("/v1/classify", json={"texts": ["a fine film", "dull"]}).json()["predictions"]
    assert [p["exit_layer"] for p in predictions] == [1, 1]


def test_early_exit_bad_inputs(teacher_dir, data_dir, tmp_path):
    outside = kdship(*_distill(teacher_dir, data_dir, tmp_path / "a", "--exits", "2"))
    assert outside.exit_code == 2 and "must be distinct layers in 1..1" in outside.stderr
    mlm = kdship(*_distill(teacher_dir, data_dir, tmp_path / "b", "--exits", "1", "--objective", "mlm"))
    assert mlm.exit_code == 2 and "early_exit works on a classifier's labelled data" in mlm.stderr
    assert not list(tmp_path.iterdir())


# ---- mean teacher, virtual teacher ------------------------------------------------------------------------------


def test_the_ema_teacher_trails_the_model():
    from kdship.config import EmaConfig
    from kdship.loop import StepInput, StepResult
    from kdship.techniques.ema import MeanTeacher
    from kdship.trainee import Forward, Trainee

    model = _tiny_early_exit_model(1).model
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainee = Trainee("model", model)
    ema = MeanTeacher([trainee], EmaConfig(decay=0.5, start=0.0), torch.device("cpu"))
    inputs = {"input_ids": torch.randint(5, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
              "labels": torch.tensor([0, 1])}

    def step(x: StepInput) -> StepResult:
        out = model(**{k: v for k, v in x.tensors.items() if k != "labels"})
        return StepResult(out.logits.sum() * 0, {}, 2, {"model": Forward(out, {})})

    wrapped = ema.wrap(step)
    for s in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)  # an optimizer step that moves every weight the same way
        result = wrapped(StepInput(inputs, [0, 1], step=s, progress=s / 5))
    weight = "bert.embeddings.word_embeddings.weight"
    moved = (model.state_dict()[weight] - initial[weight]).mean()
    trailed = (ema.averages["model"].state_dict()[weight] - initial[weight]).mean()
    assert 0 < trailed < moved and "ema_kd" in result.logs and result.loss.requires_grad


def test_mean_teacher_and_virtual_teacher_train_and_resume(teacher_dir, data_dir, tmp_path):
    args = ["train", "--model", teacher_dir, "--data", data_dir / "train.tsv", "--max-steps", 8, "--batch-size", 16,
            "--save-every", 4, "--ema-decay", "0.9", "--virtual-teacher", "0.9"]
    kdship_ok(*args, "-o", tmp_path / "straight")
    _interrupt_after_checkpoint([*args, "-o", tmp_path / "resumed"], tmp_path / ".resumed.kdship-run" / "checkpoint.pt")
    kdship_ok(*args, "-o", tmp_path / "resumed", "--resume")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA weights survived the resume exactly
    r = record(tmp_path / "straight")
    assert r["ema"]["decay"] == 0.9 and r["virtual_teacher"]["correct_prob"] == 0.9


def test_virtual_teacher_is_the_label_with_the_rest_spread():
    from kdship.techniques.virtual_teacher import virtual_teacher_logits

    scores = virtual_teacher_logits(torch.tensor([2, 0]), 4, 0.7)
    assert torch.allclose(scores, torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]]))


def test_teacher_free_techniques_need_labels(teacher_dir, data_dir, tmp_path):
    result = kdship("train", "--model", teacher_dir, "--objective", "mlm", "--virtual-teacher", "0.9", "--data",
                    data_dir / "train.tsv", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "virtual_teacher works on a classifier's labelled data" in result.stderr


# ---- online: mutual learning and ensembles, with and without a teacher -----------------------------------------


def test_peer_losses():
    from kdship.techniques.peers import ensemble_logits, peer_losses

    same = [torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, -1.0]])]
    assert all(float(t) == pytest.approx(0.0, abs=1e-6) for t in peer_losses(same, "mutual", 1.0))
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    mixture = ensemble_logits([a, b], 2.0).div(2.0).softmax(-1)
    assert torch.allclose(mixture, (a / 2).softmax(-1) / 2 + (b / 2).softmax(-1) / 2)
    mutual = peer_losses([a, b], "mutual", 1.0)
    assert mutual[0] > 0 and mutual[0] == pytest.approx(float(mutual[1]), rel=1e-5)


def test_deep_mutual_learning_without_a_teacher(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "peers"
    kdship_ok("distill", "--students", "bert:layers=1,hidden=32,heads=2,vocab=200,max_len=64,bert:layers=2,hidden=32,"
              "heads=2,vocab=200,max_len=64", "--peers", "mutual", "--tokenizer", teacher_dir, "--data",
              data_dir / "train.tsv", "--eval-data", data_dir / "dev.tsv", "--max-steps", 6, "--batch-size", 16, "-o",
              out)
    index = record(out)
    students = [record(Path(p)) for p in index["students"].values()]
    assert all(s["peers"]["mode"] == "mutual" and s["teacher"] == {"source": None, "teacher_free": True}
               for s in students)
    assert all(s["training"]["teacher_read"] is False and "accuracy" in s["metrics"] for s in students)


def test_ensemble_peers_beside_a_teacher(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "ensemble"
    kdship_ok("distill", "--teacher", teacher_dir, "--students", "1L32,2L32", "--peers", "ensemble", "--data",
              data_dir / "train.tsv", "--max-steps", 4, "--batch-size", 16, "-o", out)
    assert record(out / "1L32")["peers"]["students"] == ["1L32", "2L32"]


def test_peers_need_two_students_of_one_label_set(teacher_dir, data_dir, tmp_path):
    one = kdship(*_distill(teacher_dir, data_dir, tmp_path / "a", "--peers", "mutual"))
    assert one.exit_code == 2 and "peers trains students together" in one.stderr
    alone = kdship("distill", "--student", "bert:layers=1", "--peers", "mutual", "--data", data_dir / "train.tsv",
                   "-o", tmp_path / "b")
    assert alone.exit_code == 2 and "peers trains students together" in alone.stderr
    no_tokenizer = kdship("distill", "--students", "1L32,2L32", "--peers", "mutual", "--data", data_dir / "train.tsv",
                          "-o", tmp_path / "c")
    assert no_tokenizer.exit_code == 2 and "pass --tokenizer" in no_tokenizer.stderr
    forgot_teacher = kdship("distill", "--student", "1L32", "--data", data_dir / "train.tsv", "-o", tmp_path / "d")
    assert forgot_teacher.exit_code == 2 and "no teacher; pass --teacher" in forgot_teacher.stderr
    assert not list(tmp_path.iterdir())


# ---- several teachers -------------------------------------------------------------------------------------------


def test_combined_teachers_are_the_weighted_mixture():
    from kdship.teacher import combined_logits

    a, b = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    assert torch.equal(combined_logits([a], "mean", None, 2.0), a)
    mixed = combined_logits([a, b], "weights", [3.0, 1.0], 2.0).div(2.0).softmax(-1)
    assert torch.allclose(mixed, 0.75 * (a / 2).softmax(-1) + 0.25 * (b / 2).softmax(-1))
    sure = combined_logits([a, b], "confidence", None, 1.0).softmax(-1)
    assert sure[0, 0] > combined_logits([a, b], "mean", None, 1.0).softmax(-1)[0, 0]  # the surer teacher has more say


def test_multi_teacher_distillation(teacher_dir, second_teacher, data_dir, tmp_path):
    args = ["distill", "--teachers", f"{teacher_dir},{second_teacher}", "--student", "bert:layers=2", "--data",
            data_dir / "train.tsv", "--eval-data", data_dir / "dev.tsv", "--max-steps", 4, "--batch-size", 16]
    kdship_ok(*args, "--teacher-cache", "off", "-o", tmp_path / "live")
    r = record(tmp_path / "live")
    assert r["training"]["teacher_forward_calls"] == 2 * 4  # one forward per teacher per batch
    assert [t["source"] for t in r["teacher"]["teachers"]] == [str(teacher_dir), str(second_teacher)]
    kdship_ok(*args, "--teacher-weighting", "confidence", "--max-train-samples", 64, "-o", tmp_path / "cached")
    assert record(tmp_path / "cached")["training"]["teacher_cache"]
    refused = kdship(*args, "--loss", "hidden_mse", "-o", tmp_path / "x")
    assert refused.exit_code == 2 and "match one teacher's layers" in refused.stderr


def test_teachers_with_other_labels_are_refused(teacher_dir, three_classes, data_dir, tmp_path):
    other = tmp_path / "other"
    kdship_ok("train", "--init", TINY_TEACHER, "--tokenizer", teacher_dir, "--data", three_classes / "train.tsv",
              "--max-steps", 2, "-o", other)
    result = kdship("distill", "--teachers", f"{teacher_dir},{other}", "--student", "1L32", "--data",
                    data_dir / "train.tsv", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "several teachers must share one label set" in result.stderr


# ---- curriculum -------------------------------------------------------------------------------------------------


def test_curriculum_first_steps_see_only_the_easy_samples():
    from kdship.config import CurriculumConfig
    from kdship.techniques.curriculum import Curriculum, competence

    settings = CurriculumConfig(start=0.25, full_at=0.5)
    assert competence(0.0, settings) == 0.25 and competence(0.5, settings) == 1.0 and competence(0.9, settings) == 1.0
    hardness = torch.arange(100.0).flip(0)  # example 99 is the easiest
    curriculum = Curriculum(hardness, settings, draw=10, total_steps=20, accum=1, seed=0)
    first = curriculum.batches_of(0)[0]
    assert set(first) <= set(range(75, 100))  # the easiest quarter
    assert curriculum.batches_of(0) == curriculum.batches_of(0)  # the same draws after a resume
    late = {i for b in curriculum.batches_of(1) for i in b}  # past full_at: anything
    assert min(late) < 75
    weighted = Curriculum(hardness, settings.model_copy(update={"mode": "weighted"}), 10, 20, 1, 0)
    early = [i for b in weighted.batches_of(0)[:3] for i in b]
    assert sum(i >= 50 for i in early) > 0.6 * len(early)  # easy ones likelier early, hard ones still possible


def test_curriculum_distillation_and_resume(teacher_dir, data_dir, tmp_path):
    args = [*_distill(teacher_dir, data_dir, tmp_path / "x", "--curriculum", "loss", "--pacing", "root")[:-2],
            "--save-every", 4]
    kdship_ok(*args, "-o", tmp_path / "straight")
    _interrupt_after_checkpoint([*args, "-o", tmp_path / "resumed"], tmp_path / ".resumed.kdship-run" / "checkpoint.pt")
    kdship_ok(*args, "-o", tmp_path / "resumed", "--resume")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert record(tmp_path / "straight")["curriculum"]["available_at_start"] == 100  # a quarter of 400
    scored = kdship("train", "--model", teacher_dir, "--data", data_dir / "train.tsv", "--max-steps", 2,
                    "--curriculum", "confidence", "--curriculum-by", teacher_dir, "-o", tmp_path / "trained")
    assert scored.exit_code == 0, scored.output
    no_scorer = kdship("train", "--model", teacher_dir, "--data", data_dir / "train.tsv", "--curriculum", "loss",
                       "-o", tmp_path / "y")
    assert no_scorer.exit_code == 2 and "curriculum by: teacher needs a distillation" in no_scorer.stderr
    unknown = kdship(*_distill(teacher_dir, data_dir, tmp_path / "z", "--curriculum", "vibes"))
    assert unknown.exit_code == 2 and "curriculum.difficulty" in unknown.stderr


# ---- born-again generations and stage-wise layers ---------------------------------------------------------------


def test_born_again_generations_each_taught_by_the_last(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "born"
    kdship_ok(*_distill(teacher_dir, data_dir, out, "--generations", 3, "--keep-going", steps=4))  # (4 steps: random ones collapse)
    r = record(out)
    assert [s["name"] for s in r["stages"]] == ["generation-1", "generation-2", "generation-3"]
    assert r["stages"][1]["teacher"] == str(out / "stages" / "01-generation-1")
    assert all("accuracy" in s["metrics"] for s in r["stages"])  # accuracy per generation
    gen2 = record(out / "stages" / "02-generation-2")
    # a fresh student: not a copy of the generation before (the spec starts random; a folder from its folder)
    assert gen2["student"]["source"] == "bert:layers=2" and gen2["student"]["tensors_copied_from_teacher"] == 0


def test_stage_wise_distillation_freezes_finished_layers(teachers, data_dir, tmp_path):
    from test_progressive import _recipe

    stages = """
  - {name: lower, teacher: finetuned, data: task, objective: features, losses: [{name: hidden_mse}], train_layers: [0, 1]}
  - {name: upper, teacher: finetuned, data: task, objective: features, losses: [{name: hidden_mse}], train_layers: [2]}
  - {name: task, teacher: finetuned, data: task, objective: classify, losses: [{name: kd}, {name: ce}]}
"""
    recipe = _recipe(tmp_path, teachers, data_dir, stages).read_text().replace("student: bert:layers=1",
                                                                                "student: bert:layers=2")
    (tmp_path / "stagewise.yaml").write_text(recipe)
    out = tmp_path / "stagewise"
    kdship_ok("distill", "--recipe", tmp_path / "stagewise.yaml", "-o", out)
    lower, upper = (load_file(out / "stages" / d / "model.safetensors") for d in ("01-lower", "02-upper"))
    layer0 = [k for k in lower if ".layer.0." in k or "embeddings" in k]
    layer1 = [k for k in lower if ".layer.1." in k]
    assert all(torch.equal(lower[k], upper[k]) for k in layer0)  # finished in stage 1, frozen in stage 2
    assert any(not torch.equal(lower[k], upper[k]) for k in layer1)
    assert record(out / "stages" / "02-upper")["student"]["feature_layers"] == [2]


# ---- cross-task and cross-architecture --------------------------------------------------------------------------


def test_cross_task_teacher_teaches_through_a_learned_label_map(teacher_dir, three_classes, tmp_path):
    args = ["distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data", three_classes / "train.tsv",
            "--eval-data", three_classes / "dev.tsv", "--max-steps", 4, "--batch-size", 16]
    refused = kdship(*args, "-o", tmp_path / "a")
    assert refused.exit_code == 2 and "--cross-task" in refused.stderr
    kdship_ok(*args, "--cross-task", "--loss", "kd:0.5", "--loss", "ce:0.5", "--loss", "hidden_mse:0.5",
              "-o", tmp_path / "cross")
    r = record(tmp_path / "cross")
    assert r["cross_task"]["teacher_labels"] == ["negative", "positive"]
    assert r["cross_task"]["student_labels"] == ["long", "medium", "short"]
    assert 0 < r["cross_task"]["label_map_train_accuracy"] <= 1 and "agreement" in r["metrics"]
    assert len(json.loads((tmp_path / "cross" / "config.json").read_text())["id2label"]) == 3


def test_cross_task_teacher_without_a_head_teaches_through_features(teachers, three_classes, tmp_path):
    args = ["distill", "--teacher", teachers / "generic", "--student", "bert:layers=1", "--data",
            three_classes / "train.tsv", "--max-steps", 2, "--batch-size", 16, "--cross-task"]
    refused = kdship(*args, "-o", tmp_path / "a")
    assert refused.exit_code == 2 and "can teach only through features" in refused.stderr
    kdship_ok(*args, "--loss", "ce", "--loss", "hidden_mse", "-o", tmp_path / "b")


def test_cross_architecture_bert_teacher_to_distilbert_student(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "distilbert"
    kdship_ok("distill", "--teacher", teacher_dir, "--student", "distilbert:layers=1,hidden=32,heads=2,ffn=64",
              "--loss", "kd", "--loss", "ce", "--loss", "hidden_mse", "--data", data_dir / "train.tsv", "--eval-data",
              data_dir / "dev.tsv", "--max-steps", 4, "--batch-size", 16, "-o", out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "distilbert"
    assert record(out)["student"]["tensors_copied_from_teacher"] == 0  # another family: nothing copied by name
    kdship_ok("export", out, "--to", "onnx", "-o", tmp_path / "artifact")


# ---- augmentation -----------------------------------------------------------------------------------------------


def test_augment_writes_a_labelled_transfer_set_with_its_settings(teachers, data_dir, tmp_path):
    out = tmp_path / "aug.tsv"
    small = tmp_path / "train.tsv"
    small.write_text("\n".join((data_dir / "train.tsv").read_text().splitlines()[:21]) + "\n")
    kdship_ok("augment", "--model", teachers / "generic", "--teacher", teachers / "finetuned", "--data", small,
              "--copies", 3, "--replace-prob", 0.5, "-o", out)
    lines = out.read_text().splitlines()
    assert lines[0] == "sentence\tlabel" and 20 < len(lines) - 1 <= 20 * 4
    original = {line.split("\t")[0] for line in small.read_text().splitlines()[1:]}
    new = [line.split("\t") for line in lines[1:] if line.split("\t")[0] not in original]
    assert new and all(label in ("negative", "positive") for _, label in new)
    sidecar = json.loads(Path(str(out) + ".kdship.json").read_text())
    assert sidecar["config"]["copies"] == 3 and sidecar["augmented_rows"] == len(lines) - 1 - 20
    assert sidecar["source"]["fingerprint"].startswith("sha256:")
    kdship_ok("distill", "--teacher", teachers / "finetuned", "--student", "bert:layers=1", "--data", out,
              "--max-steps", 2, "-o", tmp_path / "student")
    refused = kdship("augment", "--model", teachers / "finetuned", "--teacher", teachers / "finetuned", "--data", small,
                     "-o", tmp_path / "x.tsv")
    assert refused.exit_code == 2 and "has no masked-LM head" in refused.stderr and not (tmp_path / "x.tsv").exists()


def test_every_family_is_listed():
    result = kdship_ok("list", "techniques")
    for name in ("early_exit", "ema", "virtual_teacher", "peers", "curriculum", "cross_task", "selection", "reverse"):
        assert name in result.output

