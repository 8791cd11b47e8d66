"""`lorafit eval`: held-out loss, perplexity and exact match of a model, with or without an adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional

from lorafit.commands.common import load_model_with_adapter
from lorafit.commands.train import BUILTIN
from lorafit.data import build_dataset, load_examples
from lorafit.evaluate import evaluate_loss, exact_match_accuracy
from lorafit.tasks import date_task_splits


@dataclass
class EvalConfig:
    """Evaluate a model (and adapter) on instruction data: loss, perplexity, exact match."""

    model: Optional[str] = None
    """Model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)."""
    adapter: Optional[str] = None
    """Adapter folder (lorafit or peft) to apply on top."""
    data: Optional[str] = None
    """JSONL/JSON file (default: the built-in task's held-out split for --seed)."""
    seed: int = 0
    """Seed of the built-in task's split (the one training used)."""
    max_length: int = 512
    """Longest example in tokens."""
    overflow: Literal["truncate", "skip"] = "truncate"
    """What to do with longer examples."""
    eval_examples: int = 100
    """Examples used for exact match (greedy generation); loss uses all."""
    max_new_tokens: int = 32
    """Generation length for exact match."""
    json: bool = False
    """Print the metrics as one JSON object."""
    dtype: Optional[str] = None
    """Model dtype (default float32)."""
    allow_pickle: bool = False
    """Allow pickle (.bin) weights."""
    trust_remote_code: bool = False
    """Run model code shipped with the model folder."""


def run(config: EvalConfig, echo=print) -> dict:
    model, tokenizer = load_model_with_adapter(config.model, config.adapter, dtype=config.dtype,
                                               allow_pickle=config.allow_pickle,
                                               trust_remote_code=config.trust_remote_code)
    if config.data is None:
        _, conversations = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, config.seed)
    else:
        conversations = load_examples(config.data)
    examples, stats = build_dataset(tokenizer, conversations, config.max_length, overflow=config.overflow)
    metrics = {**evaluate_loss(model, examples, tokenizer.pad_token_id),
               **exact_match_accuracy(model, tokenizer, conversations[: config.eval_examples], config.max_new_tokens),
               "examples": stats.kept}
    if config.json:
        echo(json.dumps(metrics))
    else:
        echo(f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}"
             + (f", exact match {metrics['exact_match']:.1%}" if "exact_match" in metrics else "")
             + f" ({stats.kept} examples)")
    return metrics
