"""Which chat template renders conversations is said by every command that renders them, recorded by a run, and a
later change is warned about."""

import json

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from tests.conftest import CHATML_TEMPLATE, write_tiny_chat_model


def _model_without_template(folder):
    write_tiny_chat_model(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_the_plain_format_is_said_recorded_and_a_later_template_is_warned_about(tmp_path, capsys):
    model = _model_without_template(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(8, seed=2)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--steps", "1", "--batch-size", "2",
                 "--eval-examples", "0", "--output", str(run)]) == 0
    said = capsys.readouterr().out
    assert ("chat template: none in the model's tokenizer, so lorafit's plain format ('### Instruction:' / "
            "'### Response:', ending in EOS), for training, eval and generate alike; give the tokenizer a "
            "chat_template to use another") in said
    recorded = json.loads((run / "lorafit-run.json").read_text())["chat_template"]
    assert recorded["source"] == "lorafit-plain" and len(recorded["sha256"]) == 64

    assert main(["generate", "--adapter", str(run), "--max-new-tokens", "2", "March 5, 2021"]) == 0
    said = "".join(capsys.readouterr())  # generate says its settings on stderr
    assert "chat template: none in the model's tokenizer" in said and "warning" not in said

    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "chat_template.jinja").write_text(CHATML_TEMPLATE)  # the tokenizer gains a template after training
    assert main(["generate", "--adapter", str(run / "adapter"), "--max-new-tokens", "2", "March 5, 2021"]) == 0
    said = "".join(capsys.readouterr())
    assert "chat template: the model's own (sha256 " in said
    assert (f"warning: the run {run} trained with none in the model's tokenizer, so lorafit's plain format") in said
    assert "renders conversations with another template now, so answers may differ" in said
    assert json.loads((model / "tokenizer_config.json").read_text()) == config
