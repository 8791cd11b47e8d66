"""`lorafit train --batch-size auto`: the planner's choice for the run's own data, said and recorded."""

import json

import yaml

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from lorafit.planner import auto_batch


def _data(tmp_path):
    path = tmp_path / "dates.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(40, seed=1)))
    return path


def _train(tiny_chat_model, data, out, capsys):
    code = main(["train", "--model", str(tiny_chat_model), "--data", str(data), "--steps", "2", "--batch-size", "auto",
                 "--eval-examples", "0", "--output", str(out), "--dtype", "float32"])
    return code, capsys.readouterr()


def test_auto_takes_every_example_when_memory_is_plentiful(tiny_chat_model, tmp_path, capsys):
    code, captured = _train(tiny_chat_model, _data(tmp_path), tmp_path / "run", capsys)
    assert code == 0, captured.err
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    chosen = recorded["batch_size"]
    assert isinstance(chosen, int) and chosen >= 8
    assert f"batch size auto: {chosen}" in captured.out and "margin" in captured.out


def test_auto_stops_where_the_plan_stops_fitting(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """With the memory the plan of batch 4 needs (and not batch 8's), auto picks between 4 and 7."""
    sizes = {}
    real_choose = auto_batch.choose_batch_size

    def measure_then_choose(planner, examples, seed, device, echo=print):
        from lorafit.train.step import layout_collate

        collate = layout_collate(0, planner.setup.row_tokens, packed=planner.packed, shared_prefix=planner.shared_prefix)
        for batch in (4, 8):
            plan = planner.plan_examples(auto_batch.worst_micro_batch(examples, batch, seed, collate))
            sizes[batch] = plan.trainable_bytes + plan.step_bytes
        monkeypatch.setattr(auto_batch, "available_now", lambda _: int(sizes[4] / (1 - auto_batch.MARGIN)) + 1)
        return real_choose(planner, examples, seed, device, echo)

    monkeypatch.setattr(auto_batch, "choose_batch_size", measure_then_choose)
    code, captured = _train(tiny_chat_model, _data(tmp_path), tmp_path / "run", capsys)
    assert code == 0, captured.err
    assert sizes[8] > sizes[4]
    chosen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["batch_size"]
    assert 4 <= chosen < 8, captured.out
    assert "would need" in captured.out


def test_auto_refuses_when_not_even_batch_one_fits(tiny_chat_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(auto_batch, "available_now", lambda _: 1000)
    code, captured = _train(tiny_chat_model, _data(tmp_path), tmp_path / "run", capsys)
    assert code == 1
    assert "--batch-size auto: even batch 1 needs" in captured.err
    assert not (tmp_path / "run").exists()  # a failed start writes nothing
