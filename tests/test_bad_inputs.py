"""Damaged, tampered and impossible inputs across every command: each is one line on stderr naming the problem
and the fix, exit code 2, no traceback, and nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import kdship


@pytest.fixture(scope="module")
def bad(teacher_dir, artifact, data_dir, tmp_path_factory) -> dict[str, Path]:
    """Damaged copies of the tiny teacher and its artifact, and a file and an empty folder where folders go."""
    root = tmp_path_factory.mktemp("bad")
    made = {"file": root / "a-file", "empty": root / "empty"}
    made["file"].write_text("not a folder\n")
    made["empty"].mkdir()
    made["truncated_model"] = shutil.copytree(teacher_dir, root / "truncated-model")
    weights = made["truncated_model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    made["pickle_model"] = shutil.copytree(teacher_dir, root / "pickle-model")
    from safetensors.torch import load_file

    state = load_file(made["pickle_model"] / "model.safetensors")
    (made["pickle_model"] / "model.safetensors").unlink()
    torch.save(state, made["pickle_model"] / "pytorch_model.bin")
    made["manifest_not_json"] = shutil.copytree(artifact, root / "manifest-not-json")
    (made["manifest_not_json"] / "manifest.json").write_text("{ this is not json")
    made["manifest_no_variants"] = shutil.copytree(artifact, root / "manifest-no-variants")
    (made["manifest_no_variants"] / "manifest.json").write_text(json.dumps({"format": "kdship-artifact/1"}))
    made["truncated_onnx"] = shutil.copytree(artifact, root / "truncated-onnx")
    for onnx in made["truncated_onnx"].glob("*.onnx"):
        onnx.write_bytes(onnx.read_bytes()[:300])
    made["tampered"] = shutil.copytree(artifact, root / "tampered")
    for onnx in made["tampered"].glob("*.onnx"):
        data = bytearray(onnx.read_bytes())
        data[-100] ^= 0xFF  # one byte of the weights: still a loadable model, no longer the exported one
        onnx.write_bytes(bytes(data))
    made["manifest_bad_entries"] = shutil.copytree(artifact, root / "manifest-bad-entries")
    (made["manifest_bad_entries"] / "manifest.json").write_text(json.dumps({"variants": {"onnx": "model.onnx"},
                                                                             "files": {}}))
    from transformers import GPT2Config, GPT2LMHeadModel

    made["gpt2"] = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(
        made["gpt2"])
    made["budgets"] = root / "budgets.yaml"
    made["budgets"].write_text("max_accuracy_drop: 0.5\n")
    made["dev"] = data_dir / "dev.tsv"
    made["train"] = data_dir / "train.tsv"
    return made


OUT = "{out}"  # the output path of a case: it must not exist afterwards
CASES = {
    # damaged weights
    "export of truncated safetensors": (["export", "{truncated_model}", "-o", OUT], "damaged or truncated"),
    "eval of truncated safetensors": (["eval", "--student", "{truncated_model}", "--data", "{dev}", "-o", OUT],
                                      "damaged or truncated"),
    "distill from a truncated teacher": (["distill", "--teacher", "{truncated_model}", "--student", "bert:layers=1",
                                          "--data", "{train}", "--max-steps", "1", "-o", OUT], "damaged or truncated"),
    "train from truncated weights": (["train", "--model", "{truncated_model}", "--data", "{train}", "--max-steps", "1",
                                      "-o", OUT], "damaged or truncated"),
    "serve --backend torch of truncated weights": (["serve", "{truncated_model}", "--backend", "torch", "--port", "0"],
                                                   "damaged or truncated"),
    # pickle weights are refused unless asked for
    "export of pickle weights": (["export", "{pickle_model}", "-o", OUT], "--allow-pickle-weights"),
    "eval of pickle weights": (["eval", "--student", "{pickle_model}", "--data", "{dev}", "-o", OUT],
                               "only pickle weights"),
    "distill from a pickle teacher": (["distill", "--teacher", "{pickle_model}", "--student", "bert:layers=1", "--data",
                                       "{train}", "--max-steps", "1", "-o", OUT], "only pickle weights"),
    "serve --backend torch of pickle weights": (["serve", "{pickle_model}", "--backend", "torch", "--port", "0"],
                                                "only pickle weights"),
    # damaged manifests
    **{f"{cmd[0]} with a manifest that is not JSON": (cmd, "is not valid JSON") for cmd in (
        ["bench", "{manifest_not_json}", "--batch", "1", "--seq", "8"], ["serve", "{manifest_not_json}", "--port", "0"],
        ["deploy", "triton", "{manifest_not_json}", "-o", OUT], ["report", "{manifest_not_json}", "-o", OUT],
        ["gate", "{manifest_not_json}", "--budgets", "{budgets}"])},
    **{f"{cmd[0]} with a manifest without variants": (cmd, "lacks variants") for cmd in (
        ["bench", "{manifest_no_variants}", "--batch", "1", "--seq", "8"],
        ["serve", "{manifest_no_variants}", "--port", "0"], ["deploy", "triton", "{manifest_no_variants}", "-o", OUT],
        ["report", "{manifest_no_variants}", "-o", OUT], ["gate", "{manifest_no_variants}", "--budgets", "{budgets}"])},
    **{f"{cmd[0]} with damaged manifest entries": (cmd, "is damaged") for cmd in (
        ["bench", "{manifest_bad_entries}", "--batch", "1", "--seq", "8"],
        ["serve", "{manifest_bad_entries}", "--port", "0"], ["gate", "{manifest_bad_entries}", "--budgets", "{budgets}"])},
    "train --objective mlm of a decoder": (["train", "--objective", "mlm", "--model", "{gpt2}", "--tokenizer", "{teacher}",
                                            "--data", "{train}", "--max-steps", "1", "-o", OUT], "cannot build a mlm model"),
    # changed model files: refused by their hash, or (--no-verify) by ONNX Runtime
    "bench of a truncated onnx": (["bench", "{truncated_onnx}", "--batch", "1", "--seq", "8", "-o", OUT],
                                  "differs from the file that was exported"),
    "serve of a truncated onnx": (["serve", "{truncated_onnx}", "--port", "0"], "differs from the file that was"),
    "bench --no-verify of a truncated onnx": (["bench", "{truncated_onnx}", "--batch", "1", "--seq", "8", "--no-verify",
                                               "-o", OUT], "cannot be loaded by ONNX Runtime"),
    "serve --no-verify of a truncated onnx": (["serve", "{truncated_onnx}", "--no-verify", "--port", "0"],
                                              "cannot be loaded by ONNX Runtime"),
    "serve of a tampered onnx": (["serve", "{tampered}", "--port", "0"], "differs from the file that was exported"),
    "bench of a tampered onnx": (["bench", "{tampered}", "--batch", "1", "--seq", "8", "-o", OUT], "re-export"),
    "deploy triton of a tampered onnx": (["deploy", "triton", "{tampered}", "--kind", "cpu", "--variant", "onnx", "-o",
                                          OUT], "differs from the file that was exported"),
    # outputs where nothing can be written
    "eval -o under a file": (["eval", "--student", "{teacher}", "--data", "{dev}", "-o", "{file}/eval.json"],
                             "is a file, so nothing can be written under it"),
    "report -o under a file": (["report", "{artifact}", "-o", "{file}/r.html"], "is a file, so nothing can be written under it"),
    "gate --junit under a file": (["gate", "{artifact}", "--budgets", "{budgets}", "--junit", "{file}/j.xml"],
                                  "is a file, so nothing can be written under it"),
    "gate --json under a file": (["gate", "{artifact}", "--budgets", "{budgets}", "--json", "{file}/j.json"],
                                 "is a file, so nothing can be written under it"),
    "export -o under a file": (["export", "{teacher}", "-o", "{file}/artifact"], "is a file, so nothing can be written under it"),
    "quickstart -o a file": (["quickstart", "-o", "{file}"], "is a file, so nothing can be written under it"),
    # impossible values
    "distill --temperature inf": (["distill", "--teacher", "{teacher}", "--student", "bert:layers=1", "--data",
                                   "{train}", "--temperature", "inf", "-o", OUT], "finite number"),
    "distill --temperature nan": (["distill", "--teacher", "{teacher}", "--student", "bert:layers=1", "--data",
                                   "{train}", "--temperature", "nan", "-o", OUT], "finite number"),
    "train --lr inf": (["train", "--model", "{teacher}", "--data", "{train}", "--lr", "inf", "-o", OUT],
                       "finite number"),
    "serve --max-wait-ms nan": (["serve", "{artifact}", "--max-wait-ms", "nan"], "finite number"),
    "export --to ,": (["export", "{teacher}", "--to", ",", "-o", OUT], "no export target given"),
    # messages that name the real problem
    "train --model of a missing folder": (["train", "--model", "./missing-model", "--data", "{train}", "-o", OUT],
                                          "missing-model not found"),
    "train --model of a file": (["train", "--model", "{file}", "--data", "{train}", "-o", OUT], "is a file"),
    "train --model of an empty folder": (["train", "--model", "{empty}", "--data", "{train}", "-o", OUT],
                                         "could not be loaded"),
    "distill --teacher of a file": (["distill", "--teacher", "{file}", "--student", "bert:layers=1", "--data",
                                     "{train}", "-o", OUT], "is a file"),
    "export of a file": (["export", "{file}", "-o", OUT], "is a file"),
    "gate with a missing budgets file": (["gate", "{artifact}", "--budgets", "{empty}/budgets.yaml"],
                                         "budgets file"),
    "serve --host that is no address": (["serve", "{artifact}", "--host", "999.1.1.1", "--port", "0"],
                                        "is not an address or a known host name"),
    "serve --host of another machine": (["serve", "{artifact}", "--host", "192.0.2.1", "--port", "0"],
                                        "not an address of this machine"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, bad, teacher_dir, artifact, tmp_path):
    args, message = CASES[case]
    out = tmp_path / "out"
    names = {**bad, "teacher": teacher_dir, "artifact": artifact, "out": out}
    result = kdship(*[a.format(**names) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")), "something was left behind"
    assert not list(bad["file"].parent.glob(".a-file*"))


def test_gate_fails_an_artifact_changed_after_export(bad, artifact):
    result = kdship("gate", bad["tampered"], "--budgets", bad["budgets"])
    assert result.exit_code == 1 and "✗ tampered files changed since export: 5" in result.output, result.output
    assert "✓ artifact files changed since export: 0" in kdship("gate", artifact, "--budgets", bad["budgets"]).output
    skipped = kdship("gate", bad["tampered"], "--budgets", bad["budgets"], "--no-verify")
    assert skipped.exit_code == 0 and "files changed" not in skipped.output


def test_pickle_weights_load_when_allowed(bad, tmp_path):
    result = kdship("eval", "--student", bad["pickle_model"], "--data", bad["dev"], "--allow-pickle-weights",
                    "-o", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["student"]["accuracy"] > 0


def test_outputs_honour_the_umask(teacher_dir, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        result = kdship("export", teacher_dir, "--to", "onnx", "-o", tmp_path / "art")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in (tmp_path / "art").iterdir() if p.is_file())


def test_records_hold_paths_that_work_from_another_folder(teacher_dir, data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for split in ("train", "dev"):
        shutil.copy(data_dir / f"{split}.tsv", run / "data" / f"{split}.tsv")
    monkeypatch.chdir(run)
    assert kdship("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data", "data/train.tsv",
                  "--eval-data", "data/dev.tsv", "--max-steps", 2, "-o", "student").exit_code == 0
    record = json.loads((run / "student" / "kdship.json").read_text())
    assert record["data"]["eval"]["source"] == str(run / "data" / "dev.tsv") == record["config"]["data"]["eval"]
    monkeypatch.chdir(tmp_path)  # elsewhere: export finds the eval data named in the record
    assert kdship("export", run / "student", "-o", "artifact").exit_code == 0
    again = kdship("export", run / "student", "-o", "artifact")  # the first problem is the one said
    assert again.exit_code == 2 and "already exists" in again.stderr
    bench = kdship("bench", "artifact", "--batch", "1", "--seq", "8", "--inputs", "real", "--max-seconds", "1",
                   "--min-runs", "3", "-o", "bench")
    assert bench.exit_code == 0, bench.output
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["results"]
    assert {r["inputs"] for r in rows} == {"real"}
