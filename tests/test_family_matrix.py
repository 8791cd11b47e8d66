"""The family matrix: every command, from the command line, on a tiny random model of each decoder family.

Each family's model folder is what a user downloads (config.json, safetensors, a tokenizer: here SmolLM2's, with its
chat template). Every command must exit 0, or refuse in one line that names the family: never a traceback. The
README's family table is this test's results (the GGUF columns: tests/formats/test_gguf_families.py).
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from tests.families import FAMILIES, write_family_model

# Default LoRA targets per family, as derived from module names (lorafit.core.targeting.default_targets).
FUSED = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"]}


@pytest.fixture(scope="module")
def dates(tmp_path_factory):
    path = tmp_path_factory.mktemp("family-data") / "dates.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(12, seed=1)))
    return path


def _no_traceback(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return captured.out


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_train_eval_generate_merge_on_every_family(model_type, tmp_path, dates, capsys):
    model = write_family_model(tmp_path / "model", model_type)
    common = ["--model", str(model), "--dtype", "float32"]
    run = tmp_path / "run"
    assert main(["train", *common, "--data", str(dates), "--steps", "2", "--batch-size", "2", "--eval-examples", "2",
                 "--max-new-tokens", "4", "--output", str(run)]) == 0
    assert "the loss runs" not in _no_traceback(capsys)  # the label-only loss, not the model run whole
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == FUSED.get(model_type, ["q_proj", "v_proj"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(0 < r["loss"] < 20 for r in log)

    assert main(["train", *common, "--data", str(dates), "--steps", "1", "--batch-size", "2", "--targets",
                 "all-linear", "--eval-examples", "0", "--output", str(tmp_path / "all-linear")]) == 0
    _no_traceback(capsys)

    assert main(["eval", *common, "--adapter", str(run), "--data", str(dates), "--eval-examples", "2",
                 "--max-new-tokens", "4", "--json"]) == 0
    metrics = json.loads(_no_traceback(capsys).strip().splitlines()[-1])
    assert metrics["examples"] == 2 and 0 < metrics["loss"] < 20

    assert main(["generate", *common, "--adapter", str(run), "--max-new-tokens", "3", "March 5, 2021"]) == 0
    assert _no_traceback(capsys)  # the reply (a random model may well reply in whitespace)

    merged = tmp_path / "merged"
    assert main(["merge", *common, "--adapter", str(run), "--output", str(merged)]) == 0
    _no_traceback(capsys)
    _assert_merged_equals_adapted(model, run / "adapter", merged)


def _assert_merged_equals_adapted(model_folder, adapter, merged_folder):
    """fp32: the merged model's logits equal base + adapter's within 1e-5 of the largest logit."""
    import lorafit

    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(model_folder).eval(), adapter)
        expected = adapted(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged_folder).eval()(input_ids=ids).logits
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
