"""Tests for lorafit.recipes.train_data through `lorafit train` and `lorafit eval`: data in every form, mapped
columns, the cache reused, a DatasetDict's validation split held out, --resume over a folder of shards."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task


def date_rows(count: int, seed: int = 1) -> list[dict]:
    """The date task as question/answer rows: columns lorafit does not know by those names."""
    return [{"question": chat[0]["content"], "answer": chat[1]["content"], "id": index}
            for index, chat in enumerate(generate_date_task(count, seed=seed))]


def train(model, data, output, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--batch-size", "4",
            "--lr", "1e-2", "--save-every", "0", "--eval-examples", "2", "--max-new-tokens", "2",
            "--output", str(output), *extra]


def dataset_dict(folder):
    """A datasets DatasetDict saved with save_to_disk: 24 chats in 'train', 6 in 'validation'."""
    import datasets

    rows = [{"messages": chat} for chat in generate_date_task(30, seed=2)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:24]),
                          "validation": datasets.Dataset.from_list(rows[24:])}).save_to_disk(folder)
    return folder


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_parquet_with_mapped_columns_trains_and_a_second_run_reuses_the_prepared_data(tmp_path, tiny_chat_model,
                                                                                      capsys):
    data = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(date_rows(24)), data)
    columns = ["--columns", "instruction=question", "output=answer"]
    capsys.readouterr()
    assert main(train(tiny_chat_model, data, tmp_path / "one", *columns)) == 0
    out = capsys.readouterr().out
    assert f"data: {data} (parquet, 1 file)" in out and "--data: prepared 24 records" in out
    assert "field 'id' is not used (24 of 24 records" in out
    assert "held-out: 1 of 24 examples (0.05)" in out
    assert main(train(tiny_chat_model, data, tmp_path / "two", *columns)) == 0
    out = capsys.readouterr().out
    assert "--data: reused the prepared 24 records" in out and "field 'id' is not used" in out
    first, second = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert first["after"]["loss"] == second["after"]["loss"]  # same data, same seed: the same run
    marker = json.loads((tmp_path / "one" / "lorafit-run.json").read_text())
    assert marker["data"]["format"] == "parquet" and marker["data"]["files"] == 1


def test_columns_from_a_yaml_mapping(tmp_path, tiny_chat_model, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in date_rows(12)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"columns": {"instruction": "question", "output": "answer"}}))
    assert main([*train(tiny_chat_model, data, tmp_path / "run"), "--config", str(config)]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["columns"] == [
        "instruction=question", "output=answer"]


def test_a_mapped_column_that_is_not_there_fails_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(date_rows(4)), data)
    assert main(["train", "--model", str(tmp_path / "no-model"), "--data", str(data), "--columns", "output=reply",
                 "--output", str(tmp_path / "run")]) == 1
    line = error_line(capsys)
    assert "'reply'" in line and str(data) in line and "question" in line  # the columns that do exist
    assert not (tmp_path / "run").exists()


def test_a_dataset_dict_trains_on_train_and_holds_out_validation_and_eval_scores_it(tmp_path, tiny_chat_model,
                                                                                   capsys):
    folder = dataset_dict(tmp_path / "hf")
    capsys.readouterr()
    assert main(train(tiny_chat_model, folder, tmp_path / "run", "--eval-examples", "6")) == 0
    out = capsys.readouterr().out
    assert "split 'train'" in out and "held-out data:" in out and "split 'validation'" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["held_out_examples"] == 6
    assert main(["eval", "--model", str(tiny_chat_model), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--data", str(folder), "--json", "--max-new-tokens", "2", "--eval-examples", "6"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["examples"] == 6 and evaluated["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-5)


def test_resume_refuses_a_folder_of_shards_when_one_shard_changed(tmp_path, tiny_chat_model, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = date_rows(24)
    for index in range(3):
        (shards / f"part-{index}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows[index * 8:(index + 1) * 8]))
    args = train(tiny_chat_model, shards, tmp_path / "run", "--columns", "instruction=question", "output=answer",
                 "--save-every", "1")
    assert main(args) == 0
    with (shards / "part-2.jsonl").open("a") as handle:
        handle.write(json.dumps(rows[0]) + "\n")
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "3"]) == 1
    assert "--data" in (line := error_line(capsys)) and "has changed since the run started" in line


def test_held_out_given_on_a_dataset_dict_splits_train_and_resume_keeps_that_split(tmp_path, tiny_chat_model,
                                                                                   capsys):
    folder = dataset_dict(tmp_path / "hf")
    capsys.readouterr()
    assert main(train(tiny_chat_model, folder, tmp_path / "run", "--held-out", "4", "--save-every", "1")) == 0
    out = capsys.readouterr().out
    assert "held-out data:" not in out and "held-out: 4 of 24 examples (--held-out 4)" in out
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "held-out data:" not in out and "held-out: 4 of 24 examples (--held-out 4)" in out


def test_records_whose_every_reply_is_empty_are_counted_in_one_warning(tiny_chat_model, tmp_path, capsys):
    rows = [{"instruction": f"say hi {i}", "output": "" if i % 3 == 0 else "hi"} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(data), "--steps", "1", "--batch-size", "2",
                 "--eval-examples", "0", "--output", str(tmp_path / "run")]) == 0
    assert (f"warning: {data}: 4 of 12 records have only empty replies (first at {data}:1); they train on the "
            "end-of-turn token alone: fill in or drop their output") in capsys.readouterr().out
