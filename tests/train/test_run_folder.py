"""What lorafit recognises as its own in a run folder, and so what --overwrite may delete."""

import pytest

from lorafit.errors import LorafitError
from lorafit.train import run_folder


def _run(tmp_path, marker=True):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    for name in ("config.yaml", "metrics.json", "log.jsonl", "loss.png"):
        (run / name).write_text("x")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    for name in ("trainer_state.json", "optimizer.safetensors", "rng.safetensors", "training_state.safetensors",
                 "adapter_config.json", "adapter_model.safetensors"):
        (run / "checkpoints" / "step-000002" / name).write_text("x")
    if marker:
        run_folder.write_marker(run, {})
    return run


def test_a_clean_run_folder_has_nothing_foreign_and_interrupted_writes_count_as_lorafits(tmp_path):
    run = _run(tmp_path)
    (run / ".log.jsonl.tmp-123").write_text("half")
    (run / "checkpoints" / ".step-000004.tmp-77").mkdir()
    (run / "checkpoints" / ".step-000002.tmp-deleting").mkdir()
    assert run_folder.is_run_folder(run) and run_folder.foreign_entries(run) == []


@pytest.mark.parametrize("extra", ["notes.txt", "adapter/README.md", "checkpoints/step-000002/extra.bin",
                                   "checkpoints/best", "data/"])
def test_anything_else_is_foreign(tmp_path, extra):
    run = _run(tmp_path)
    path = run / extra.rstrip("/")
    if extra.endswith("/"):
        path.mkdir()
    else:
        path.write_text("mine")
    assert run_folder.foreign_entries(run) == [extra]
    with pytest.raises(LorafitError, match="files lorafit did not write"):
        run_folder.clear_run(run)
    assert path.exists()


def test_a_symlink_in_place_of_a_run_file_is_foreign(tmp_path):
    run = _run(tmp_path)
    (run / "log.jsonl").unlink()
    (run / "log.jsonl").symlink_to(tmp_path)  # deleting "the log" must not reach what it points to
    assert run_folder.foreign_entries(run) == ["log.jsonl/"]


def test_runs_made_before_the_marker_existed_are_recognised(tmp_path):
    assert run_folder.is_run_folder(_run(tmp_path, marker=False))
    lone_yaml = tmp_path / "project"
    lone_yaml.mkdir()
    (lone_yaml / "config.yaml").write_text("steps: 3")  # a user's own settings file: not a run
    assert not run_folder.is_run_folder(lone_yaml)


def test_clear_run_empties_the_folder_marker_last(tmp_path, monkeypatch):
    run = _run(tmp_path)
    removed = []
    real_unlink = type(run).unlink

    def record(path, *args, **kwargs):
        removed.append(path.name)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(type(run), "unlink", record)
    run_folder.clear_run(run)
    assert list(run.iterdir()) == [] and removed[-1] == run_folder.MARKER


def test_check_output_refuses_an_output_holding_an_input(tmp_path):
    data = tmp_path / "proj" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("{}")
    for output in (tmp_path / "proj", tmp_path):
        with pytest.raises(LorafitError, match=r"holds this run's input \(--data"):
            run_folder.check_output(output, overwrite=True, inputs={"--data": data})
    run_folder.check_output(tmp_path / "elsewhere", overwrite=False, inputs={"--data": data})  # fine: new folder
