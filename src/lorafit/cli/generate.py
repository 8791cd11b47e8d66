"""`lorafit generate`: answer one prompt with a model (and adapter), streaming tokens as they come.

The reply is the only thing on stdout (settings and notes go to stderr), so it can be piped.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import tyro

from lorafit.cli.common import OptionalAdapterFolder, print_settings
from lorafit.errors import LorafitError
from lorafit.models.options import ModelLoadOptions


@dataclass
class GenerateConfig(ModelLoadOptions):
    """Generate a reply to a prompt; the model's chat template is applied."""

    prompt: tyro.conf.Positional[str]
    """The user message."""
    adapter: OptionalAdapterFolder = None
    system: Optional[str] = None
    """A system message (default: the template's own)."""
    max_new_tokens: int = 128
    """Longest reply in tokens."""
    temperature: float = 0.0
    """0 for greedy decoding; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold when sampling."""
    seed: int = 0
    """Sampling seed."""


def run(config: GenerateConfig, echo=print, given=None) -> str:
    from lorafit.inference.generation import stream_reply
    from lorafit.inference.loading import load_model_with_adapter

    if config.max_new_tokens < 1:
        raise LorafitError(f"--max-new-tokens must be >= 1, got {config.max_new_tokens}")
    if not (math.isfinite(config.temperature) and config.temperature >= 0):
        raise LorafitError(f"--temperature must be a finite number >= 0 (0: greedy), got {config.temperature}")
    if not 0 < config.top_p <= 1:  # also false for NaN
        raise LorafitError(f"--top-p must be in (0, 1], got {config.top_p}")
    if given is None:
        default = GenerateConfig(prompt=config.prompt)
        given = {name for name in ("top_p", "seed") if getattr(config, name) != getattr(default, name)}
    for name in ("top_p", "seed"):
        if name in given and config.temperature == 0:
            raise LorafitError(f"--{name.replace('_', '-')} applies when sampling; greedy decoding (--temperature 0) "
                               "does not use it: give --temperature > 0 too")
    print_settings(config, to_stderr=True)
    model, tokenizer, _ = load_model_with_adapter(config.model, config.adapter, dtype=config.dtype,
                                                  quantize=config.quantize, double_quant=config.double_quant,
                                                  allow_pickle=config.allow_pickle,
                                                  trust_remote_code=config.trust_remote_code,
                                                  echo=lambda line: print(line, file=sys.stderr))
    messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
        {"role": "user", "content": config.prompt}]
    return stream_reply(model, tokenizer, messages, max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature, top_p=config.top_p, seed=config.seed)
