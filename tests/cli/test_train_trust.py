"""`lorafit train` keeps a user's files safe and never trains on something other than what was asked.

Each test is a case of issue 13, run through the real command line on a tiny model folder. "Intact"
means byte for byte: a snapshot of every file's bytes before and after.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from tests.conftest import mounted_tmpfs, write_tiny_chat_model


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_dates(path: Path, count: int, seed: int = 1) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(count, seed=seed)))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dates(tmp_path_factory.mktemp("data") / "dates.jsonl", 24)


def train_args(model, data, output, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--steps", "4", "--batch-size", "4",
            "--lr", "1e-2", "--save-every", "2", "--eval-examples", "2", "--max-new-tokens", "3",
            "--output", str(output), *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_chat_model, data):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(tiny_chat_model, data, run)) == 0
    return run


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1, 2: --overwrite replaces only what lorafit wrote, and only after everything is checked ----------------
def test_output_holding_the_data_is_refused_and_nothing_is_deleted(tmp_path, tiny_chat_model, capsys):
    project = tmp_path / "proj"
    project.mkdir()
    data = write_dates(project / "data.jsonl", 12)
    (project / "notes.txt").write_text("mine")
    before = snapshot(project)
    assert main(train_args(tiny_chat_model, data, project, "--overwrite")) == 1
    assert "holds this run's input (--data" in error_line(capsys)
    assert snapshot(project) == before


def test_output_that_is_the_model_folder_is_refused(tmp_path, data, capsys):
    model = write_tiny_chat_model(tmp_path / "model")
    before = snapshot(model)
    assert main(train_args(model, data, model, "--overwrite")) == 1
    assert "holds this run's input (--model" in error_line(capsys)
    assert snapshot(model) == before


def test_overwrite_refuses_a_folder_lorafit_did_not_make(tmp_path, tiny_chat_model, data, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert main(train_args(tiny_chat_model, data, folder, "--overwrite")) == 1
    assert "is not a lorafit run folder (it holds thesis.tex)" in error_line(capsys)
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_run_folder_holding_foreign_files(tmp_path, tiny_chat_model, data, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "adapter" / "README.md").write_text("my notes on this adapter")
    before = snapshot(run)
    assert main(train_args(tiny_chat_model, data, run, "--overwrite")) == 1
    assert "holds files lorafit did not write (adapter/README.md)" in error_line(capsys)
    assert snapshot(run) == before


@pytest.mark.parametrize("bad", [["--r", "1000"], ["--targets", "q_prj"]], ids=["rank", "target"])
def test_a_failed_overwrite_leaves_the_previous_run_as_it_was(tmp_path, tiny_chat_model, data, finished_run, capsys,
                                                              bad):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    assert main(train_args(tiny_chat_model, data, run, "--overwrite", *bad)) == 1
    error_line(capsys)
    assert snapshot(run) == before


def test_overwrite_replaces_an_earlier_run(tmp_path, tiny_chat_model, data, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(train_args(tiny_chat_model, data, run, "--overwrite", "--r", "4")) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["r"] == 4
    assert load_file(run / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4


# -- 3, 4: --resume continues the run as it was started ------------------------------------------------------
def test_resume_takes_the_runs_settings_and_keeps_its_before_metrics(tmp_path, tiny_chat_model, data, finished_run,
                                                                     capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = json.loads((run / "metrics.json").read_text())["before"]
    assert before is not None
    # no --model, no --data: both come from the run, as does every other setting; only --steps grows
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["before"] == before and metrics["steps"] == 6
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"] == str(data.resolve()) and resolved["steps"] == 6 and resolved["lr"] == 1e-2
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_settings_that_differ_and_changes_nothing(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--steps", "6", "--r", "4", "--lr", "3e-3", "--seed", "1"]) == 1
    line = error_line(capsys)
    assert "--r 4 now, 8 in the run" in line and "--lr 0.003 now, 0.01 in the run" in line
    assert "--seed 1 now, 0 in the run" in line
    assert snapshot(run) == before


def test_resume_of_a_finished_run_needs_more_steps(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run)]) == 1
    assert "the run is finished (step 4 of 4); pass --steps N with N > 4" in error_line(capsys)


def test_resume_refuses_data_that_changed(tmp_path, tiny_chat_model, capsys):
    data = write_dates(tmp_path / "data.jsonl", 12)
    run = tmp_path / "run"
    assert main(train_args(tiny_chat_model, data, run, "--steps", "2")) == 0
    write_dates(data, 12, seed=9)
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 1
    assert "has changed since the run started" in error_line(capsys)


def test_resume_refuses_another_output_and_overwrite(finished_run, tmp_path, capsys):
    assert main(["train", "--resume", str(finished_run), "--steps", "6", "--output", str(tmp_path / "x")]) == 1
    assert "continues in the run's own folder" in error_line(capsys)
    assert main(["train", "--resume", str(finished_run), "--overwrite"]) == 1
    assert "give one of them" in error_line(capsys)


# -- 5: a checkpoint is an adapter that loads correctly -------------------------------------------------------
def test_a_pissa_checkpoint_evaluates_as_the_final_adapter(tmp_path, tiny_chat_model, data, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_chat_model, data, run, "--init", "pissa")) == 0

    def loss(adapter):
        capsys.readouterr()
        assert main(["eval", "--adapter", str(adapter), "--data", str(data), "--json", "--max-new-tokens", "0"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]

    final = loss(run / "adapter")
    assert loss(run / "checkpoints" / "step-000004") == pytest.approx(final, rel=1e-6)
    assert loss(run) == pytest.approx(final, rel=1e-6)  # a run folder names its adapter/


# -- 6: an adapter remembers its base model ------------------------------------------------------------------
def test_eval_and_merge_without_model_use_the_recorded_base_and_refuse_another(tmp_path, finished_run, data,
                                                                              tiny_chat_model, capsys):
    capsys.readouterr()
    args = ["eval", "--adapter", str(finished_run / "adapter"), "--data", str(data), "--json", "--max-new-tokens", "0"]
    assert main(args) == 0
    out = capsys.readouterr()
    without_model = json.loads(out.out.strip().splitlines()[-1])
    assert f"model: {tiny_chat_model.resolve()} (the base recorded in" in out.err
    assert main(args + ["--model", str(tiny_chat_model)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == without_model

    other = write_tiny_chat_model(tmp_path / "other", seed=5)  # same shapes, other weights
    assert main(args + ["--model", str(other)]) == 1
    assert "is another model (same shapes but other weights" in error_line(capsys)
    assert main(["merge", "--adapter", str(finished_run), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_an_adapter_that_names_no_local_base_needs_model(tmp_path, finished_run, data, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file(tensors, adapter / "adapter_model.safetensors")  # no lorafit record, as peft writes it
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["eval", "--adapter", str(adapter), "--data", str(data)]) == 1
    assert "'HuggingFaceTB/SmolLM2-135M' in its adapter_config.json, not a local folder); pass --model" in \
        error_line(capsys)


# -- 9, 11: every setting honoured or refused -----------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number > 0, got nan"),
    (["--lora-plus-ratio", "nan"], "--lora-plus-ratio must be a finite number > 0, got nan"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--dropout", "nan"], "--dropout must be in [0, 1), got nan"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["--method", "ia3", "--r", "16"], "--r is a LORA/DORA setting; --method ia3 does not use it"),
    (["--method", "bitfit", "--lora-plus-ratio", "16"], "--lora-plus-ratio is a LORA/DORA setting"),
    (["--held-out", "0.5"], "--held-out applies to --data; the built-in task holds out its own 100 examples"),
    (["--dtype", "float8"], "--dtype 'float8' is unknown"),
])
def test_settings_out_of_range_or_not_applying_are_refused_before_loading(flags, message, capsys, monkeypatch):
    monkeypatch.setattr("lorafit.models.loading.load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["train", *flags]) == 1
    assert message in error_line(capsys)


def test_weights_that_become_infinite_stop_the_run_and_are_never_saved(tmp_path, tiny_chat_model, data, capsys,
                                                                      monkeypatch):
    import torch

    step = torch.optim.AdamW.step

    def step_that_overflows(self, *args, **kwargs):  # what a huge update does to a float32 weight
        result = step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_overflows)
    run = tmp_path / "run"
    assert main(train_args(tiny_chat_model, data, run, "--on-nonfinite", "skip")) == 1
    assert "step 3 made the adapter's weights NaN/Inf" in error_line(capsys)
    assert not (run / "adapter").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # the last good one, and no other


def test_a_learning_rate_beyond_float32_is_refused(capsys):
    assert main(["train", "--lr", "1e39"]) == 1
    assert "--lr must be a finite number > 0, got 1e+39" in error_line(capsys)


def test_max_new_tokens_zero_skips_exact_match_and_keeps_the_loss(tmp_path, tiny_chat_model, data):
    run = tmp_path / "run"
    assert main(train_args(tiny_chat_model, data, run, "--max-new-tokens", "0", "--steps", "2")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "exact_match" not in metrics["after"] and "exact_match" not in metrics["before"]
    assert "loss" in metrics["after"] and metrics["exact_match_examples"] == 0


def test_eval_examples_zero_scores_nothing_and_says_so(tmp_path, tiny_chat_model, data, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(tiny_chat_model, data, run, "--eval-examples", "0", "--steps", "2")) == 0
    out = capsys.readouterr().out
    assert "examples set aside and not scored (--eval-examples 0)" in out and "held-out after training" not in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["before"] == {} and metrics["after"] == {} and metrics["held_out_examples"] == 0


def test_generate_refuses_a_nan_temperature_and_top_p_without_sampling(capsys):
    assert main(["generate", "--temperature", "nan", "hi"]) == 1
    assert "--temperature must be a finite number >= 0" in error_line(capsys)
    assert main(["generate", "--top-p", "0.5", "hi"]) == 1
    assert "--top-p applies when sampling" in error_line(capsys)


# -- 10: held-out loss and exact match on the same examples -------------------------------------------------
def test_held_out_examples_longer_than_max_length_are_left_out_of_both_and_counted(tmp_path, tiny_chat_model, data,
                                                                                  capsys):
    held = write_dates(tmp_path / "held.jsonl", 4, seed=3)
    long_record = {"messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y"}]}
    with held.open("a") as handle:
        handle.write(json.dumps(long_record) + "\n")
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(tiny_chat_model, data, run, "--eval-data", str(held), "--max-length", "200",
                           "--eval-examples", "10", "--steps", "2", "--max-new-tokens", "10")) == 0
    assert "1 of 5 held-out examples left out of loss and exact match (1 longer than --max-length 200" in \
        capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["held_out_examples"] == 4 and metrics["exact_match_examples"] == 4


def test_held_out_data_with_nothing_that_fits_names_the_file(tmp_path, tiny_chat_model, data, capsys):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "x" * 300, "completion": "y"}) + "\n")
    assert main(train_args(tiny_chat_model, data, tmp_path / "run", "--eval-data", str(held),
                           "--max-length", "100")) == 1
    line = error_line(capsys)
    assert f"{held}: no held-out examples left" in line and "--max-length" in line
    assert not (tmp_path / "run").exists()


# -- 12, 13: nothing in the data is dropped silently ---------------------------------------------------------
def test_ignored_fields_and_empty_examples_are_reported(tmp_path, tiny_chat_model, capsys):
    data = tmp_path / "data.jsonl"
    records = [{"messages": m, "id": i} for i, m in enumerate(generate_date_task(12, seed=1))] + [{"text": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    assert main(train_args(tiny_chat_model, data, tmp_path / "run", "--held-out", "0", "--steps", "3",
                           "--eval-examples", "0")) == 0
    out = capsys.readouterr().out
    assert "field 'id' is not used (12 of 13 records" in out
    assert "1 with no trained tokens" in out


# -- 14: an output that cannot be written fails before the model loads ---------------------------------------
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_output_that_is_a_file_fails_before_loading(tmp_path, data, where, capsys, monkeypatch):
    monkeypatch.setattr("lorafit.models.loading.load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "f").write_text("x")
    output = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    assert main(["train", "--data", str(data), "--output", str(output)]) == 1
    assert "give a folder" in error_line(capsys)


def test_output_on_a_read_only_file_system_fails_before_loading(tmp_path, data, capsys, monkeypatch):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        monkeypatch.setattr("lorafit.models.loading.load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
        assert main(["train", "--data", str(data), "--output", str(mount / "run")]) == 1
        assert "cannot write in" in (line := error_line(capsys)) and "read-only file system" in line


def test_output_without_permission_fails_before_loading(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setattr("lorafit.models.loading.load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # what mkdtemp raises in a folder of another user

    monkeypatch.setattr("lorafit.files.tempfile.mkdtemp", refuse)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run")]) == 1
    assert "permission denied" in error_line(capsys)


# -- 16: a damaged run resumes from what is intact, or says what is damaged ---------------------------------
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_chat_model, data, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_chat_model, data, run, "--steps", "4", "--keep-checkpoints", "2")) == 0
    state_file = run / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["position"]["step"] = "four"
    state_file.write_text(json.dumps(state))
    with (run / "log.jsonl").open("a") as log:
        log.write('{"step": 5, "lo')  # what a kill in the middle of a write leaves
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "step-000004 is damaged: trainer_state.json: position.step is 'four', not a count" in out
    assert "resumed from" in out and "step-000002" in out
    assert "1 damaged line(s) dropped" in out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_a_damaged_checkpoint_named_explicitly_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoints" / "step-000004" / "trainer_state.json").write_text('{"position": ')
    assert main(["train", "--resume", str(run / "checkpoints" / "step-000004"), "--steps", "6"]) == 1
    assert f"checkpoint {run / 'checkpoints' / 'step-000004'} is damaged: Expecting value" in error_line(capsys)


# -- files lorafit writes are readable by others, like any file the user writes -----------------------------
def test_adapter_files_get_the_usual_permissions(finished_run, tmp_path):
    probe = tmp_path / "probe"
    probe.write_text("x")
    expected = probe.stat().st_mode & 0o777
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (finished_run / "adapter" / name).stat().st_mode & 0o777 == expected, name
    checkpoint = finished_run / "checkpoints" / "step-000004"
    assert (checkpoint / "optimizer.safetensors").stat().st_mode & 0o777 == expected


# -- the command line itself -----------------------------------------------------------------------------------
def test_help_loads_neither_torch_nor_transformers():
    code = ("import sys; from lorafit.cli.main import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert "--batch-size" in result.stdout and result.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize("command", [["train"], ["eval"], ["merge", "--adapter", "ADAPTER", "--output", "OUT"],
                                     ["inspect"]], ids=["train", "eval", "merge", "inspect"])
def test_every_command_prints_its_settings_before_loading_the_model(command, finished_run, tmp_path, capsys,
                                                                  monkeypatch):
    from lorafit.errors import LorafitError

    def not_yet(*args, **kwargs):
        raise LorafitError("(the model would load here)")

    monkeypatch.setattr("lorafit.models.loading.load_model_and_tokenizer", not_yet)
    monkeypatch.setattr("lorafit.models.loading.resolve_model_folder", not_yet)
    args = [str(finished_run) if a == "ADAPTER" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.startswith("settings:\n") and any(line.startswith("model:") for line in out.splitlines()[1:6])


def test_a_one_record_file_suggests_held_out_zero(tmp_path, tiny_chat_model, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    assert main(train_args(tiny_chat_model, data, tmp_path / "run")) == 1
    assert "pass --held-out 0 (train on all of it, no held-out evaluation) or give --eval-data FILE" in \
        error_line(capsys)


def test_eval_leaves_out_examples_longer_than_max_length_from_both_metrics(tmp_path, finished_run, capsys):
    held = write_dates(tmp_path / "held.jsonl", 3, seed=3)
    with held.open("a") as handle:
        handle.write(json.dumps({"prompt": "x" * 400, "completion": "y"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(finished_run), "--data", str(held), "--max-length", "200", "--json",
                 "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["examples"] == 3 and metrics["left_out"] == 1
    assert "1 of 4 held-out examples left out of loss and exact match (1 longer than --max-length 200" in captured.err
