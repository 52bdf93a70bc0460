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
    made["unhashed"] = shutil.copytree(made["tampered"], root / "unhashed")  # changed models, their hashes removed
    manifest = json.loads((made["unhashed"] / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.endswith(".onnx")}
    (made["unhashed"] / "manifest.json").write_text(json.dumps(manifest))
    made["garbage_pickle"] = shutil.copytree(made["pickle_model"], root / "garbage-pickle")
    (made["garbage_pickle"] / "pytorch_model.bin").write_bytes(b"\x80\x04 this is no pickle at all")
    made["no_tensors"] = shutil.copytree(teacher_dir, root / "no-tensors")
    from safetensors.torch import save_file

    save_file({}, made["no_tensors"] / "model.safetensors", metadata={"format": "pt"})
    made["wrong_shape"] = shutil.copytree(teacher_dir, root / "wrong-shape")
    state = load_file(made["wrong_shape"] / "model.safetensors")
    state["classifier.weight"] = torch.zeros(7, state["classifier.weight"].shape[1])
    save_file(state, made["wrong_shape"] / "model.safetensors", metadata={"format": "pt"})
    made["bad_eval"] = shutil.copytree(artifact, root / "bad-eval")
    (made["bad_eval"] / "eval.json").write_text(json.dumps({"student": {"accuracy": "high"}, "label_names": ["a"]}))
    made["link_loop"] = root / "loop.tsv"
    made["link_loop"].symlink_to(made["link_loop"])
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
    "serve --host empty": (["serve", "{artifact}", "--host", "", "--port", "0"], "host: String should have at least"),
    # a changed model whose hash was removed from the manifest is no unchanged model
    **{f"{cmd[0]} of a model without a recorded hash": (cmd, "has no sha256 in the manifest") for cmd in (
        ["bench", "{unhashed}", "--batch", "1", "--seq", "8", "-o", OUT], ["serve", "{unhashed}", "--port", "0"],
        ["deploy", "triton", "{unhashed}", "--kind", "cpu", "--variant", "onnx", "-o", OUT],
        ["report", "{unhashed}", "-o", "{out}/r.html"])},
    "report of a tampered artifact": (["report", "{tampered}", "-o", "{out}/r.html"], "differs from the file"),
    # weights that load but are not what they claim
    "eval of a damaged pickle, allowed": (["eval", "{garbage_pickle}", "--data", "{dev}", "--allow-pickle-weights",
                                          "-o", OUT], "weights could not be loaded"),
    "eval of weights of another shape": (["eval", "{wrong_shape}", "--data", "{dev}", "-o", OUT],
                                         "weights could not be loaded"),
    "eval of a weights file without tensors": (["eval", "{no_tensors}", "--data", "{dev}", "-o", OUT],
                                               "so they would be random"),
    # saved results that are not what kdship writes
    "gate of an eval.json with text for a number": (["gate", "{bad_eval}", "--budgets", "{budgets}"],
                                                    "student accuracy is not a number"),
    "report of an eval.json with text for a number": (["report", "{bad_eval}", "-o", "{out}/r.html"],
                                                      "student accuracy is not a number"),
    "deploy triton --max-batch beyond int32": (["deploy", "triton", "{artifact}", "--max-batch", "1" + "0" * 20, "-o",
                                                OUT], "less than or equal to 2147483647"),
    "train --max-steps beyond any run": (["train", "--model", "{teacher}", "--data", "{train}", "--max-steps",
                                          "1" + "0" * 30, "-o", OUT], "less than or equal to"),
    # outputs that are folders, and folders that are files
    "eval -o a folder": (["eval", "{teacher}", "--data", "{dev}", "-o", "{empty}"], "is a folder; give a file path"),
    "report -o a folder": (["report", "{artifact}", "-o", "{empty}"], "is a folder; give the report's file path"),
    "gate --json a folder": (["gate", "{artifact}", "--budgets", "{budgets}", "--json", "{empty}"], "is a folder"),
    "gate --junit a folder": (["gate", "{artifact}", "--budgets", "{budgets}", "--junit", "{empty}"], "is a folder"),
    "bench of a file": (["bench", "{file}", "--batch", "1", "--seq", "8", "-o", OUT], "is a file, not a folder"),
    "gate of a file": (["gate", "{file}", "--budgets", "{budgets}"], "is a file, not a folder"),
    "gate --budgets a folder": (["gate", "{artifact}", "--budgets", "{empty}"], "is a folder; give the YAML file"),
    "export -o where nothing can be written": (["export", "{teacher}", "-o", "/proc/kdship-artifact"],
                                               "choose another path"),
    "distill a student of a negative shape": (["distill", "--teacher", "{teacher}", "--student", "bert:layers=-3",
                                               "--data", "{train}", "-o", OUT], "layers must be a positive integer"),
    "distill --data an empty folder": (["distill", "--teacher", "{teacher}", "--student", "bert:layers=1", "--data",
                                        "{empty}", "-o", OUT], "is empty"),
    "distill --data a link loop": (["distill", "--teacher", "{teacher}", "--student", "bert:layers=1", "--data",
                                    "{link_loop}", "-o", OUT], "broken link or a link loop"),
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


def test_outputs_honour_the_umask(teacher_dir, data_dir, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        made = {"art": kdship("export", teacher_dir, "--to", "onnx", "-o", tmp_path / "art"),
                "student": kdship("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data",
                                  data_dir / "train.tsv", "--max-steps", 2, "-o", tmp_path / "student"),
                "model": kdship("train", "--model", teacher_dir, "--data", data_dir / "train.tsv", "--max-steps", 2,
                                "-o", tmp_path / "model")}
    finally:
        os.umask(old)
    for name, result in made.items():
        assert result.exit_code == 0, result.output
        folder = tmp_path / name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o644}, modes  # model.safetensors too (transformers writes it 0600)


def test_sigterm_during_export_leaves_nothing(teacher_dir, tmp_path):
    """docker stop / a cancelled CI job: the command unwinds as for Ctrl-C, no staging folder stays behind."""
    import signal
    import subprocess
    import sys
    import time

    run = subprocess.Popen([sys.executable, "-m", "kdship", "export", str(teacher_dir), "--to", "onnx,ort-opt,int8",
                            "-o", str(tmp_path / "art")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".art.staging.*")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, "the export ended before it could be stopped"
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


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
    assert {r["inputs"] for r in rows} == {"real"} and {r["path"] for r in rows} == {str(tmp_path / "artifact")}
    # the tree moved as a whole (data and student): the record's paths relative to itself still lead to the data
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    result = kdship("export", moved / "student", "-o", "artifact-after-move")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "artifact-after-move" / "manifest.json").read_text())
    assert manifest["checked_on"]["inputs"] == str(moved / "data" / "dev.tsv"), manifest["checked_on"]
