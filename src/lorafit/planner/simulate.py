"""Two optimizer steps of lorafit's training loop on a fake model, with every tensor's bytes counted.

The planner does not model the loop: it runs it. The micro-batch is collated by the loop's own collate
(`layout_collate`: examples alone, packed rows, a shared prefix), each piece goes through the loop's own
forward, loss and backward (`accumulate_gradients`: label-only chunked logits, the frozen-head loss,
activation checkpointing when asked) into the gradient tensors the loop makes once (`StepGradients`), then the
same gradient clipping and AdamW step. Two steps, because
AdamW's states exist from the first step on, so the second is the one every later step repeats.
`LiveBytes` records the live bytes after each decoder layer, at the end of the body, and the peak.

What differs from a real run is said where it is handled: for a piece that is one sequence (no padding,
nothing packed), transformers skips the attention mask, unless its inputs are fake tensors (it cannot
read them to find out); the planner drops that mask again (`_planner_attention`), so the step it counts is
the one that really runs.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample
from lorafit.planner.tracker import LiveBytes
from lorafit.train.attention import use_fp32_attention
from lorafit.train.batching import Batch, collate_alone
from lorafit.train.gradients import StepGradients
from lorafit.train.loop import LoopSettings
from lorafit.train.setup import parameter_groups, set_activation_checkpointing
from lorafit.train.step import accumulate_gradients, clip_and_step

PLANNER_ATTENTION = "lorafit_planner"


@dataclass
class _AttentionState:
    inner: str = "sdpa"
    single_sequence: bool = False
    tracker: LiveBytes | None = None


_attention = _AttentionState()


def _planner_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention the loop uses (`_attention.inner`), without the mask a real run would not build."""
    if _attention.single_sequence and attention_mask is not None:
        _attention.tracker.forget(attention_mask)
        attention_mask = None
    return ALL_ATTENTION_FUNCTIONS[_attention.inner](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PLANNER_ATTENTION, _planner_attention)
AttentionMaskInterface.register(PLANNER_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@dataclass
class StepMemory:
    """Bytes of one training step as the planner counted them (all on top of the model's weights)."""

    peak: int  # the most bytes alive at once during the second step, above weights and adapter
    activations: int  # saved for backward at the end of the largest piece's forward (its body)
    per_layer: list[int] = field(default_factory=list)  # of those, what each decoder layer added
    loss_peak: int = 0  # the loss's own buffers at their peak (logits chunk, softmax, the hidden gradient)
    pieces: list[tuple] = field(default_factory=list)  # each forward call's input shape


def _is_single_sequence(piece: Batch) -> bool:
    """One row holding one example, unpadded: transformers runs it without an attention mask."""
    inputs = piece.inputs
    if "prefix_ids" in inputs or inputs["input_ids"].shape[0] != 1:
        return False
    if "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
        return False
    positions = inputs.get("position_ids")
    return positions is None or bool((positions[0] == torch.arange(positions.shape[1])).all())


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model body's list of decoder layers (the longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


def _distinct(pieces: list[Batch]) -> list[Batch]:
    """Pieces whose shapes differ: equal shapes allocate the same, so one of each is enough."""
    seen, kept = set(), []
    for piece in pieces:
        key = (tuple((k, tuple(v.shape)) for k, v in sorted(piece.inputs.items())), piece.label_tokens)
        if key not in seen:
            seen.add(key)
            kept.append(piece)
    return kept


def _tiny_piece(model: nn.Module) -> Batch:
    ids = [1, 2, 3, 4]
    return collate_alone(TokenizedExample(ids, [IGNORE_INDEX, 2, 3, 4]))


class _Marks:
    """Hooks that note the live bytes after each decoder layer, at the body's start and end, and the loss's own
    peak (from the body's end to the start of the last layer's backward), for the piece being run."""

    def __init__(self, model: nn.Module, tracker: LiveBytes) -> None:
        self.tracker, self.layers = tracker, _decoder_layers(model) or []
        self.after_layer: list[int] = []
        self.body_end: list[int] = []
        self.loss: list[int] = []
        body = getattr(model, "base_model", model)
        self.hooks = [layer.register_forward_hook(lambda *_: self.after_layer.append(tracker.live))
                      for layer in self.layers]
        self.hooks.append(body.register_forward_pre_hook(lambda *_: self.body_end.append(tracker.live)))
        self.hooks.append(body.register_forward_hook(self._body_done))
        if self.layers:
            self.hooks.append(self.layers[-1].register_full_backward_pre_hook(self._backward_starts))

    def _body_done(self, *_) -> None:  # the loss starts: its own peak is counted from here
        self.body_end.append(self.tracker.live)
        self.loss.append(self.tracker.peak)
        self.tracker.reset_peak()

    def _backward_starts(self, *_) -> None:  # the loss is done (its backward is a scalar multiplication)
        self.loss.append(self.tracker.peak)
        self.tracker.peak = max(self.tracker.peak, self.loss[0])

    def clear(self) -> None:
        self.after_layer.clear()
        self.body_end.clear()
        self.loss.clear()

    def described(self) -> StepMemory:
        """The piece just run: its saved activations, per decoder layer, and the loss's own peak."""
        start, end = self.body_end[0], self.body_end[1]
        marks = [start] + self.after_layer[: len(self.layers)]
        return StepMemory(0, end - start, [b - a for a, b in zip(marks, marks[1:])],
                          loss_peak=self.loss[1] - end if len(self.loss) > 1 else 0)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def simulate_steps(model: nn.Module, mode, pieces: list[Batch], settings: LoopSettings, *,
                   autocast_dtype: torch.dtype | None = None, on_cpu: bool = True) -> StepMemory:
    """Two optimizer steps on the fake `model`: a tiny one (AdamW's states appear), then `pieces` (one
    micro-batch's forward calls), whose peak is the one every later step repeats. Pieces of equal shapes
    are run once (they allocate the same); the largest runs first and is the one described per layer."""
    pieces = sorted(_distinct(pieces), key=lambda p: -p.inputs["input_ids"].numel())
    tracker = LiveBytes(list(model.parameters()) + list(model.buffers()))
    marks = _Marks(model, tracker)
    previous = use_fp32_attention(model) if on_cpu else None
    inner = model.config._attn_implementation
    planner_attention = getattr(model, "_supports_attention_backend", False)
    if planner_attention:
        model.set_attn_implementation(PLANNER_ATTENTION)
    _attention.inner, _attention.tracker = inner, tracker
    if settings.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    groups, _ = parameter_groups(model, settings)
    parameters = [p for group in groups for p in group["params"]]
    largest = StepMemory(0, 0)
    tiny = _tiny_piece(model)  # real token ids, made before the fake mode (which cannot read values)
    single = {id(piece): planner_attention and _is_single_sequence(piece) for piece in [tiny, *pieces]}
    try:
        model.train()
        with mode, tracker, autocast, warnings.catch_warnings():
            # the last layer's backward pre-hook fires on its output's gradient, which is all it is for
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
            gradients = StepGradients(parameters)  # the loop makes them once, before its first step
            # Step one creates AdamW's states; a tiny call does that as well as the real pieces would.
            for step_pieces in ([tiny], pieces):
                tracker.reset_peak()
                step_labels = sum(piece.label_tokens for piece in step_pieces)
                gradients.lend()
                for index, piece in enumerate(step_pieces):
                    marks.clear()
                    _attention.single_sequence = single[id(piece)]
                    accumulate_gradients(model, [piece], step_labels)
                    if step_pieces is pieces and index == 0:
                        largest = marks.described()
                gradients.drop_unreached()
                clip_and_step(parameters, optimizer, settings.max_grad_norm)
            largest.peak = tracker.peak
    finally:
        marks.remove()
        if settings.gradient_checkpointing:
            set_activation_checkpointing(model, False)
        if planner_attention:
            model.set_attn_implementation(inner)
        if previous is not None:
            model.set_attn_implementation(previous)
        _attention.tracker = None
    largest.pieces = [tuple(piece.inputs["input_ids"].shape) for piece in pieces]
    return largest
