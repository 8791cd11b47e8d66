"""`lorafit train`: fine-tune a causal LM with an adapter, show it learned, save the adapter.

With no arguments: the embedded SmolLM2-135M-Instruct on the built-in date task (rewrite a date in ISO 8601),
held-out exact match and loss printed before and after training. The flags are `TrainConfig`'s fields
(lorafit.recipes.train_settings); the job is lorafit.recipes.train, phase by phase.
"""

from __future__ import annotations

from typing import Optional

from lorafit.recipes.train_settings import TrainConfig

__all__ = ["TrainConfig", "run"]


def run(config: TrainConfig, echo=print, given: Optional[set[str]] = None) -> dict:
    """The whole job; returns the metrics it printed (also written to <run>/metrics.json)."""
    from lorafit.recipes.train import run_training

    return run_training(config, echo=echo, given=given)
