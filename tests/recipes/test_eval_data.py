"""`lorafit eval` without --data: the held-out data of the run the adapter comes from, said and recorded."""

import json

import pytest

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from tests.cli.test_train_trust import error_line


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("own-data") / "dates.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(16, seed=3)))
    return path


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, tiny_chat_model, own_data):
    run = tmp_path_factory.mktemp("own-run") / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(own_data), "--held-out", "0.25",
                 "--steps", "2", "--batch-size", "2", "--dtype", "float32", "--eval-examples", "10",
                 "--max-new-tokens", "0", "--output", str(run)]) == 0
    return run


def _eval_json(capsys, *args) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--dtype", "float32", "--max-new-tokens", "0", "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.mark.parametrize("adapter", ["", "adapter", "checkpoints/step-000002"])
def test_eval_scores_the_runs_own_held_out_examples_and_says_so(own_run, own_data, capsys, adapter):
    metrics, said = _eval_json(capsys, "--adapter", own_run / adapter)
    assert metrics["data"] == (f"the held-out part of {own_data} (jsonl, 1 file), as the run {own_run} set it aside")
    assert f"data: {metrics['data']} (no --data given; --data scores other data)" in said
    assert "held-out: 4 of 16 examples" in said and metrics["examples"] == 4 and metrics["exact_match_examples"] == 0
    # the same examples the run scored after training, with the same adapter: the same loss
    after = json.loads((own_run / "metrics.json").read_text())["after"]
    assert abs(metrics["loss"] - after["loss"]) <= 1e-6


def test_eval_refuses_a_runs_data_that_changed_since(own_run, own_data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(own_run, copy)
    original = own_data.read_bytes()
    try:
        own_data.write_bytes(original + original.splitlines(keepends=True)[0])
        assert main(["eval", "--adapter", str(copy), "--json"]) == 1
        assert error_line(capsys) == (
            f"lorafit eval: error: {own_data} has changed since the run {copy} read it (its SHA-256 differs from the "
            f"one in {copy / 'lorafit-run.json'}): the run's held-out examples cannot be found in it again; give --data "
            "to score the data as it is now")
    finally:
        own_data.write_bytes(original)


def test_without_a_run_to_ask_eval_says_it_scores_the_built_in_task(own_run, tmp_path, capsys):
    import shutil

    lone = tmp_path / "lone-adapter"
    shutil.copytree(own_run / "adapter", lone)
    metrics, said = _eval_json(capsys, "--adapter", lone, "--eval-examples", "3")
    assert metrics["data"] == "the built-in date task's 100 held-out examples (seed 0)"
    assert (f"data: the built-in date task's 100 held-out examples (seed 0), as no --data was given and {lone} is not "
            "in a lorafit run folder that records its data; --data scores your own") in said
    assert metrics["examples"] == 3


def test_a_run_that_held_out_nothing_is_refused_pointing_to_data(tiny_chat_model, own_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(own_data), "--held-out", "0", "--steps", "1",
                 "--batch-size", "2", "--output", str(run)]) == 0
    assert main(["eval", "--adapter", str(run)]) == 1
    assert error_line(capsys) == (f"lorafit eval: error: the run {run} held out no examples of its data (--held-out 0, "
                                  "no --eval-data): give --data to score")
