"""`--quantize` end to end on a tiny model folder: train records it, eval/generate/merge follow it, merges
are into float unless a re-quantizing one is forced, and bad combinations are one line."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from tests.cli.test_train_trust import error_line, snapshot

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, tiny_quantizable_chat_model):
    root = tmp_path_factory.mktemp("nf4")
    data = root / "dates.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(24, seed=1)))
    run = root / "run"
    code = main(["train", "--model", str(tiny_quantizable_chat_model), "--data", str(data), "--steps", "4", "--batch-size", "4",
                 "--lr", "1e-2", "--quantize", "nf4", "--double-quant", "--targets", "all-linear", "--dtype", "float32",
                 "--eval-examples", "2", "--max-new-tokens", "4", "--output", str(run)])
    assert code == 0
    return run, data


def test_train_reports_and_records_the_quantization(nf4_run, capsys):
    run, _ = nf4_run
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["quantize"] == "nf4" and resolved["double_quant"] is True
    assert resolved["quantized"]["quantized_layers"] == 14
    assert resolved["quantized"]["left_in_float"] == ["embeddings", "output head", "norms"]
    assert resolved["quantized"]["weight_bytes"] < resolved["quantized"]["weight_bytes_float"]
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        record = json.loads(handle.metadata()["lorafit_base_model"])
    assert record["quantize"] == {"kind": "nf4", "double_quant": True, "dtype": "float32"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]


def test_eval_loads_the_base_as_the_adapter_was_trained_and_gives_trains_figure(nf4_run, capsys):
    run, data = nf4_run
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--data", str(data), "--max-new-tokens", "0", "--json"]) == 0
    out = capsys.readouterr()
    assert "quantize: nf4 + double quantization (the base quantization recorded in" in out.err
    assert "quantized 14 linear layers to nf4 + double quantization" in out.err
    assert json.loads(out.out)["loss"] < 10
    # the float base is a choice the user states, not a silent default
    assert main(["eval", "--adapter", str(run), "--data", str(data), "--max-new-tokens", "0", "--json",
                 "--quantize", "none"]) == 0
    assert "quantize: nf4" not in capsys.readouterr().err


def test_resume_refuses_another_quantization(nf4_run, capsys):
    run, data = nf4_run
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--steps", "6", "--quantize", "int8"]) == 1
    assert "--quantize int8 now, nf4 in the run" in error_line(capsys)
    assert snapshot(run) == before


def test_merge_defaults_to_the_dequantized_base_and_reproduces_the_adapter(nf4_run, tmp_path, capsys):
    from lorafit.inference.loading import load_model_with_adapter
    from lorafit.models.loading import load_model_and_tokenizer

    run, _ = nf4_run
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")]) == 0
    assert "merge into: dequantized (the weights the adapter was trained against, in float)" in capsys.readouterr().out
    marker = json.loads((tmp_path / "merged" / "lorafit-merge.json").read_text())
    assert marker["merged_into"] == "dequantized" and marker["trained_on"]["kind"] == "nf4"
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    adapted, _, _ = load_model_with_adapter(None, str(run), dtype="float32", echo=lambda _: None)
    merged, _ = load_model_and_tokenizer(tmp_path / "merged")
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "original"), "--merge-into",
                 "original"]) == 0
    original, _ = load_model_and_tokenizer(tmp_path / "original")
    with torch.no_grad():  # the original float weights + the adapter: another model (the quantization error)
        assert (original(ids).logits - adapted(ids).logits).abs().max() > 1e-3


def test_a_requantizing_merge_needs_force_and_writes_nothing_without_it(nf4_run, tmp_path, capsys):
    run, _ = nf4_run
    output = tmp_path / "requantized"
    assert main(["merge", "--adapter", str(run), "--output", str(output), "--merge-into", "quantized"]) == 1
    assert "pass --force-requantize to accept that" in error_line(capsys)
    assert not output.exists()
    assert main(["merge", "--adapter", str(run), "--output", str(output), "--merge-into", "quantized",
                 "--force-requantize"]) == 0
    assert json.loads((output / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.parametrize("args, message", [
    (["train", "--double-quant"], "--double-quant applies to --quantize nf4 or fp4"),
    (["train", "--quantize", "int8", "--double-quant"], "--double-quant applies to --quantize nf4 or fp4"),
    (["train", "--quantize", "nf3"], "--quantize 'nf3' is unknown (did you mean nf4?)"),
    (["merge", "--adapter", "{adapter}", "--output", "{tmp}/m", "--merge-into", "original", "--quantize", "none"],
     "--merge-into and --force-requantize apply to an adapter trained on a quantized base"),
])
def test_bad_quantization_flags_are_one_line(args, message, nf4_run, tmp_path, capsys):
    run, _ = nf4_run
    args = [a.format(adapter=run, tmp=tmp_path) for a in args]
    assert main(args) == 1
    assert message in error_line(capsys)
