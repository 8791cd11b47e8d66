"""`lorafit eval`: held-out loss, perplexity and exact match of a model, with or without an adapter.

Loss and exact match are measured on the same examples, those that fit --max-length whole (the
others are counted and reported, as in `lorafit train`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from lorafit.cli.common import OptionalAdapterFolder, print_settings
from lorafit.errors import LorafitError
from lorafit.models.options import ModelLoadOptions


@dataclass(kw_only=True)
class EvalConfig(ModelLoadOptions):
    """Evaluate a model (and adapter) on instruction data: loss, perplexity, exact match."""

    adapter: OptionalAdapterFolder = None
    data: Optional[str] = None
    """JSONL/JSON file (default: the built-in task's held-out split for --seed)."""
    seed: int = 0
    """Seed of the built-in task's split (the one training used)."""
    max_length: int = 512
    """Longest example in tokens; longer ones are left out of loss and exact match, and counted."""
    eval_examples: int = 100
    """Examples used for exact match (greedy generation); loss uses all; 0 skips exact match."""
    max_new_tokens: int = 32
    """Generation length for exact match."""
    json: bool = False
    """Print the metrics as one JSON object (the settings then go to stderr)."""


def run(config: EvalConfig, echo=print, given=None) -> dict:
    from lorafit.data.tasks import BUILTIN, date_task_splits
    from lorafit.data.tokenizing import read_examples
    from lorafit.inference.evaluate import evaluate_loss, exact_match_accuracy, held_out_set
    from lorafit.inference.loading import load_model_with_adapter

    if config.max_length < 2 or config.eval_examples < 0 or config.max_new_tokens < 1:
        raise LorafitError("--max-length must be >= 2, --eval-examples >= 0 and --max-new-tokens >= 1")
    print_settings(config, to_stderr=config.json)
    # With --json, stdout is the one JSON object; everything else goes to stderr.
    note = echo if not config.json else (lambda line: print(line, file=sys.stderr))
    if config.data is None:
        _, conversations = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, config.seed)
    else:
        loaded = read_examples(config.data)
        for ignored in loaded.ignored:
            note(f"warning: {ignored}")
        conversations = loaded.conversations
    model, tokenizer, _ = load_model_with_adapter(config.model, config.adapter, dtype=config.dtype,
                                                  quantize=config.quantize, double_quant=config.double_quant,
                                                  allow_pickle=config.allow_pickle,
                                                  trust_remote_code=config.trust_remote_code, echo=note)
    held = held_out_set(tokenizer, conversations, config.max_length, source=config.data or "the built-in task")
    if held.left_out:
        note(f"warning: {held.describe_left_out(config.max_length)}")
    metrics = {**evaluate_loss(model, held.examples, tokenizer.pad_token_id),
               **(exact_match_accuracy(model, tokenizer, held.conversations[: config.eval_examples],
                                       config.max_new_tokens) if config.eval_examples else {}),
               "examples": held.stats.kept, "left_out": held.left_out}
    if config.json:
        echo(json.dumps(metrics))
    else:
        echo(f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}"
             + (f", exact match {metrics['exact_match']:.1%}" if "exact_match" in metrics else "")
             + f" ({held.stats.kept} examples" + (f", {held.left_out} left out" if held.left_out else "") + ")")
    return metrics
