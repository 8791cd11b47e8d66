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
    """Data in any form `lorafit train --data` takes (a file, folder, glob or datasets folder, whose validation or
    test split is scored) (default: the held-out data of the run --adapter comes from; the built-in task's held-out
    split when that run trained on it, or when there is no run to ask, which the output then says)."""
    columns: Optional[list[str]] = None
    """The data's own names for lorafit's record fields, as KEY=COLUMN items (see `lorafit train --help`)."""
    seed: int = 0
    """Seed of the built-in task's split (default: the run's own, when --adapter comes from a run)."""
    max_length: int = 512
    """Longest example in tokens; longer ones are left out of loss and exact match, and counted."""
    eval_examples: int = 100
    """Examples scored, by the loss and exact match alike: the first N that fit --max-length whole."""
    max_new_tokens: int = 32
    """Generation length for exact match (0: no exact match, the loss only)."""
    json: bool = False
    """Print the metrics as one JSON object (the settings then go to stderr)."""


def run(config: EvalConfig, echo=print, given=None) -> dict:
    from lorafit.data.columns import ColumnMap
    from lorafit.inference.evaluate import evaluate_loss, exact_match_accuracy, held_out_from, matchable
    from lorafit.inference.loading import load_model_with_adapter
    from lorafit.recipes.eval_data import choose_eval_data

    if config.max_length < 2 or config.eval_examples < 1 or config.max_new_tokens < 0:
        raise LorafitError("--max-length must be >= 2, --eval-examples >= 1 and --max-new-tokens >= 0")
    print_settings(config, to_stderr=config.json)
    # With --json, stdout is the one JSON object; everything else goes to stderr.
    note = echo if not config.json else (lambda line: print(line, file=sys.stderr))
    chosen = choose_eval_data(config.data, ColumnMap.parse(config.columns), config.adapter, config.seed,
                              "seed" in (given or ()), note)
    model, tokenizer, _ = load_model_with_adapter(config.model, config.adapter, dtype=config.dtype,
                                                  quantize=config.quantize, double_quant=config.double_quant,
                                                  allow_pickle=config.allow_pickle,
                                                  trust_remote_code=config.trust_remote_code, echo=note)
    prepared, records = chosen.prepare(tokenizer, config.max_length, note)
    held = held_out_from(prepared, records, config.eval_examples, chosen.described)
    if held.left_out:
        note(f"warning: {held.describe_left_out(config.max_length)}")
    to_match = matchable(tokenizer, held.conversations, config.max_new_tokens)
    note(f"scoring: {held.describe_scored(len(to_match), config.max_new_tokens)}")
    metrics = {**evaluate_loss(model, held.examples, tokenizer.pad_token_id),
               **exact_match_accuracy(model, tokenizer, to_match, config.max_new_tokens),
               "examples": len(held.examples), "left_out": held.left_out, "data": chosen.described,
               "exact_match_examples": len(to_match)}
    if config.json:
        echo(json.dumps(metrics))
    else:
        echo(f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}"
             + (f", exact match {metrics['exact_match']:.1%}" if "exact_match" in metrics else "")
             + f" ({len(held.examples)} examples" + (f", {held.left_out} left out" if held.left_out else "") + ")")
    return metrics
