"""kdship's folders in the tools users already have: a plain transformers tokenizer class, pipelines on long input."""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerFast, pipeline


def test_saved_tokenizer_loads_as_a_plain_fast_tokenizer_and_truncates_at_the_models_positions(teacher_dir):
    config = json.loads((teacher_dir / "tokenizer_config.json").read_text())
    positions = json.loads((teacher_dir / "config.json").read_text())["max_position_embeddings"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not transformers 5's "TokenizersBackend"
    assert config["model_max_length"] == positions
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    long_text = "a good film " * 400
    assert len(tokenizer(long_text, truncation=True)["input_ids"]) == positions
    classify = pipeline("text-classification", model=str(teacher_dir), device="cpu")
    labels = json.loads((teacher_dir / "config.json").read_text())["id2label"].values()
    assert classify(long_text, truncation=True)[0]["label"] in labels


def test_exported_artifact_tokenizer_is_portable_too(artifact):
    config = json.loads((artifact / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == json.loads((artifact / "config.json").read_text())["max_position_embeddings"]


def test_progress_is_plain_lines_when_stdout_is_no_terminal(data_dir, teacher_dir, tmp_path):
    """CI logs get one line per evaluation and one at the end, not a bar drawn once and cut to the log's width."""
    from conftest import kdship_ok

    out = kdship_ok("train", "--init", "bert:layers=1,hidden=32,heads=2,ffn=64,max_len=64", "--tokenizer", teacher_dir,
                    "--data", data_dir / "train.tsv", "--eval-data", data_dir / "dev.tsv", "--batch-size", 8,
                    "--max-steps", 6, "--eval-every", 3, "-o", tmp_path / "run").output
    lines = [line for line in out.splitlines() if line.startswith("train step ")]
    assert any(line.startswith("train step 3/6") and "| eval accuracy=" in line for line in lines), out
    assert lines[-1].startswith("train step 6/6 (100%") and "samples/s" in lines[-1]
    assert "━" not in out  # no bar


def test_shipped_recipes_load_by_name_from_any_folder(teacher_dir, data_dir, tmp_path, monkeypatch):
    from conftest import kdship, kdship_ok

    monkeypatch.chdir(tmp_path)  # no pipelines/ here: the installed copy is found
    kdship_ok("distill", "--recipe", "task_kd", "--teacher", teacher_dir, "--student", "bert:layers=1",
              "--data", data_dir / "train.tsv", "--max-steps", 2, "--batch-size", 8, "-o", tmp_path / "s")
    record = json.loads((tmp_path / "s" / "kdship.json").read_text())
    assert [loss["name"] for loss in record["config"]["losses"]] == ["kd", "ce"]
    bad = kdship("distill", "--recipe", "task_kdd", "--teacher", teacher_dir, "--student", "bert:layers=1",
                 "--data", data_dir / "train.tsv", "-o", tmp_path / "t")
    assert bad.exit_code == 2 and "shipped recipes, by name:" in bad.output and "task_kd," in bad.output


def test_every_package_of_the_source_tree_is_in_the_wheel():
    """pyproject lists packages by hand (two folders are mapped in): one left out installs a kdship that fails
    on import everywhere but in an editable checkout."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "kdship").rglob("__init__.py")}
    assert on_disk <= set(setup["packages"])
    for package, folder in setup["package-dir"].items():
        assert (root / folder / "__init__.py").exists(), package


def _without_module_run_cli(module: str, *args: str):
    """The real CLI in a fresh process in which `module` cannot be imported (as if its extra were not installed)."""
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = ['kdship', *{list(map(str, args))!r}]; "
            "from kdship.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_serve_and_triton_without_their_extras_say_which_extra_to_install(artifact, tmp_path):
    served = _without_module_run_cli("fastapi", "serve", artifact)
    assert served.returncode == 2 and "Traceback" not in served.stderr
    assert served.stderr.strip() == ("error: kdship serve needs fastapi, which is not installed; "
                                     "pip install 'kdship[serve]'")
    triton = _without_module_run_cli("tritonclient.grpc", "deploy", "triton", artifact, "-o", tmp_path / "repo")
    assert triton.returncode == 2 and "pip install 'kdship[triton]'" in triton.stderr
    assert not (tmp_path / "repo").exists()


def test_export_of_a_model_without_data_checks_parity_on_built_in_texts(teacher_dir, tmp_path):
    """A folder made elsewhere (no kdship.json naming its data): every variant is still checked against PyTorch,
    and the manifest says accuracy was not measured instead of refusing or pretending."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import kdship_ok

    plain = tmp_path / "plain"
    AutoModelForSequenceClassification.from_pretrained(teacher_dir).save_pretrained(plain)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(plain)
    result = kdship_ok("export", plain, "--to", "onnx", "-o", tmp_path / "artifact")
    assert "accuracy was not measured" in result.output
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["checked_on"] == {"inputs": "built-in texts (no eval data: accuracy not measured)",
                                      "rows": manifest["config"]["eval_samples"], "accuracy_measured": False}
    onnx = manifest["variants"]["onnx"]["parity"]
    assert onnx["passed"] and onnx["agreement"] == 1.0 and "accuracy" not in onnx


def test_export_output_is_kdships_not_other_libraries_noise(teacher_dir, data_dir, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kdship.cli", "export", str(teacher_dir), "--to", "onnx,ort-opt,int8",
                           "--eval-data", str(data_dir / "dev.tsv"), "-o", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    both = done.stdout + done.stderr
    for noise in ("Skipping torchvision", "pre-processing before quantization", "LeafSpec"):
        assert noise not in both, both[-2000:]


def test_tensorrt_profile_shapes_from_the_command_line(teacher_dir, tmp_path):
    from conftest import kdship, kdship_ok

    kdship_ok("export", teacher_dir, "--to", "onnx", "--trt-opt", "4x32", "--trt-max", "16x64", "-o", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]
    assert (config["trt_opt_batch"], config["trt_opt_seq"], config["trt_max_batch"], config["trt_max_seq"]) == (
        4, 32, 16, 64)
    for flags, message in ((["--trt-opt", "8"], "give BATCHxSEQ"), (["--trt-opt", "64x32", "--trt-max", "16x64"],
                                                                   "exceeds its max")):
        bad = kdship("export", teacher_dir, "--to", "onnx", *flags, "-o", tmp_path / "b")
        assert bad.exit_code == 2 and message in bad.output and not (tmp_path / "b").exists()


def test_report_to_tensorboard_logs_losses_learning_rate_and_evaluations(data_dir, teacher_dir, tmp_path,
                                                                          monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import kdship, kdship_ok

    args = ["train", "--init", "bert:layers=1,hidden=32,heads=2,ffn=64,max_len=64", "--tokenizer", teacher_dir,
            "--data", data_dir / "train.tsv", "--eval-data", data_dir / "dev.tsv", "--batch-size", 8,
            "--max-steps", 20, "--eval-every", 10, "--report-to", "tensorboard"]
    kdship_ok(*args, "-o", tmp_path / "run")
    [events] = (tmp_path / "run-logs" / "run").glob("events.out.tfevents.*")  # beside it: the hparams run
    scalars = EventAccumulator(str(events.parent)).Reload()
    tags = scalars.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/accuracy"} <= set(tags), tags
    assert [e.step for e in scalars.Scalars("eval/accuracy")] == [10, 20]
    assert [e.step for e in scalars.Scalars("train/loss")] == [10, 20]
    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)  # as if the extra were not installed
    missing = kdship(*args, "-o", tmp_path / "other")
    assert missing.exit_code == 2 and "pip install 'kdship[tracking]'" in missing.output
