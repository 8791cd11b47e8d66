"""The model split as the label-only loss runs it: body, output head, and what the family does to the logits after.

Most families compute logits = head(hidden). A few transform them after the head, in the model's own forward:
Gemma 2 (and Gemma 3 when configured) soft-cap them, cap·tanh(z / cap) with `final_logit_softcapping`;
Granite divides them by `logits_scaling`; Cohere (Command-R) multiplies them by `logit_scale`. The loss keeps
its fast path (the head on labelled positions only, a shared prompt prefix computed once) for those families
by applying the same transform itself, `LogitTransform`.

A family that transforms its logits in a way lorafit does not know would be trained on the wrong loss without
a word, so the split is checked against the model's own forward once per model (`check_output_head`, which the
step's layout chooser and the evaluation call); a model that fails it, or that has no separate body and head,
runs through its own forward (every position's logits; no shared prefix) from then on.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap · tanh(scale · z / softcap) of the head's output z (no tanh when softcap is None)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> LogitTransform:
        """The transform a transformers config asks for (the attributes the families' forwards read; a multimodal
        model's text config holds them)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        scale = 1.0
        logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
        if isinstance(logit_scale, (int, float)):
            scale *= float(logit_scale)
        logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
        if isinstance(logits_scaling, (int, float)) and logits_scaling:
            scale /= float(logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        return cls(scale, float(softcap) if softcap else None)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Out of place, so autograd differentiates it (a trainable head's path)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def apply_(self, logits: torch.Tensor) -> torch.Tensor | float:
        """Transform `logits` in place; returns d(out)/d(in), elementwise (a tensor) or one number.

        Soft-capping: d/dz cap·tanh(s·z/cap) = s·(1 − tanh²), computed from the tanh before it is scaled back.
        """
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is None:
            return self.scale
        logits.div_(self.softcap).tanh_()
        derivative = (1.0 - logits.square()).mul_(self.scale)
        logits.mul_(self.softcap)
        return derivative


@dataclass(frozen=True)
class OutputHead:
    """The model's body (hidden states), its output head, and the transform that follows the head."""

    body: nn.Module
    head: nn.Module
    transform: LogitTransform


# Models whose own logits the split did not reproduce (check_output_head): they run through their own forward.
_RUN_WHOLE: weakref.WeakSet = weakref.WeakSet()


def output_head(model) -> OutputHead | None:
    """The split of `model` the loss can run, or None when the loss must call the model's own forward."""
    if model in _RUN_WHOLE:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = _body_of(model)
    if head is None or body is None:
        return None
    return OutputHead(body, head, LogitTransform.of(getattr(model, "config", None)))


def _body_of(model) -> nn.Module | None:
    """The decoder stack that returns the last hidden states: `base_model`, else `get_decoder()`, else the child
    named `model` (Llama 4's text model names its base_model_prefix `language_model` but keeps its body in
    `model`). check_output_head verifies whichever was found."""
    body = getattr(model, "base_model", None)
    if body is not None and body is not model:
        return body
    get_decoder = getattr(model, "get_decoder", None)
    try:
        body = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError):
        body = None
    if not isinstance(body, nn.Module) or body is model:
        body = getattr(model, "model", None)
    return body if isinstance(body, nn.Module) and body is not model else None


@torch.no_grad()
def check_output_head(model, tolerance: float = 1e-4) -> bool:
    """Do body → head → transform give the model's own logits? If not, the loss runs the model whole from now on.

    Compared relative to the largest logit, on one short random sequence, with dropout off.
    """
    split = output_head(model)
    if split is None:
        return False
    device = next(model.parameters()).device
    vocab_size = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab_size, (1, 6), generator=torch.Generator().manual_seed(2)).to(device)
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=ids, use_cache=False).logits.float()
        hidden = split.body(input_ids=ids, use_cache=False).last_hidden_state
        ours = split.transform(split.head(hidden)).float()
    except (TypeError, ValueError, RuntimeError, AttributeError):
        ours = None
    finally:
        model.train(was_training)
    if ours is None or ours.shape != own.shape or not bool(
            (own - ours).abs().max() <= tolerance * max(1.0, float(own.abs().max()))):
        _RUN_WHOLE.add(model)
        return False
    return True
