"""What the training loop runs with, built once before its first step: seeds, the optimizer (one group per
learning rate) and its warm-up + cosine schedule, the resumed state, the batch layout, the compiled body, the
gradient tensors, and the step log cut back to a resumed checkpoint. The memory planner and the benchmarks
build the same things from here, so what they measure is what the loop runs.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.core.adapters import wrappers
from lorafit.errors import LorafitError
from lorafit.files import atomic_path
from lorafit.heap import release_freed_memory
from lorafit.train.batching import Batch
from lorafit.train.checkpoint import Position, read_checkpoint, restore_checkpoint
from lorafit.train.gradients import StepGradients
from lorafit.train.output_head import output_head
from lorafit.train.step import choose_collate


@dataclass
class TrainingSetup:
    """What the loop runs with; `setup_training` builds it."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    parameters: list[torch.Tensor]  # the trainable ones, in `parameter_names` order
    parameter_names: list[str]  # the order checkpoints store the optimizer state in
    position: Position  # where the steps start: the beginning, or the resumed checkpoint's position
    collate: Callable[[list], list[Batch]]  # a micro-batch's examples → its forward calls
    body: torch.nn.Module | None  # the torch.compile'd model body; None runs the model's own
    gradients: StepGradients  # the parameters' gradient tensors, made here, before any step's activations


def setup_training(model, settings, run_dir: Path, *, pad_id: int, vocab_size: int,
                   resume: Path | None = None, echo: Callable[[str], None] = print,
                   writes: bool = True, same_calls_everywhere: bool = False) -> TrainingSetup:
    """Seeds, optimizer and schedule, the resumed state, the batch layout, the compiled body, the log.

    Resume restores the optimizer, the schedule and the random state over what is built here, and the
    step log is cut back to the checkpoint's step (the steps after it will be redone; `writes`: this
    process writes the run folder, rank 0 under torchrun). `same_calls_everywhere` (FSDP2): no layout whose
    number of forward calls depends on a rank's share (the shared prefix).
    """
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    groups, parameter_names = parameter_groups(model, settings)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, settings.warmup_steps, settings.steps)
    position = Position()
    if resume is not None:
        position = restore_checkpoint(read_checkpoint(resume), model, optimizer, scheduler, parameter_names)
        echo(f"resumed from {resume} at step {position.step}")
    collate = choose_collate(model, vocab_size, pad_id, settings.row_tokens, settings.gradient_checkpointing, echo,
                             shared_prefix=not same_calls_everywhere)
    body = compiled_body(model, settings.compile_backend, device, echo) if settings.compile_backend else None
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(run_dir / "log.jsonl", position.step, echo)
    parameters = [p for group in groups for p in group["params"]]
    release_freed_memory()  # what the load, the evaluation before training and the layout probes freed
    gradients = StepGradients(parameters)  # after the trim: they stay below the heap the steps will use
    return TrainingSetup(optimizer, scheduler, parameters, parameter_names, position, collate, body, gradients)


def parameter_groups(model, settings) -> tuple[list[dict], list[str]]:
    """Trainable parameters in a stable named order, one optimizer group per learning rate.

    `settings.lr_ratios` (from the method, e.g. LoRA+: {"lora_B": 16}) multiplies the learning rate of
    the adapter tensors held in those parameter dicts; the rest learn at `settings.lr`.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LorafitError("no trainable parameters: attach an adapter before training")
    ratio_of = {}
    for _, wrapper in wrappers(model) if settings.lr_ratios else ():
        for dict_name in wrapper.adapter_parameter_dicts:
            for parameter in getattr(wrapper, dict_name).values():
                ratio_of[id(parameter)] = settings.lr_ratios.get(dict_name, 1.0)
    by_ratio: dict[float, list] = {1.0: []}
    for name, parameter in named:
        by_ratio.setdefault(ratio_of.get(id(parameter), 1.0), []).append((name, parameter))
    members = [m for m in by_ratio.values() if m]
    groups = [{"params": [p for _, p in m], "lr": settings.lr * r} for r, m in by_ratio.items() if m]
    return groups, [n for m in members for n, _ in m]


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                           ) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate times step/warmup during the warm-up, then times ½(1 + cos(π·progress)) down to 0 at
    `total_steps` (cosine annealing, Loshchilov & Hutter 2017, arXiv:1608.03983, without restarts).

    The same multipliers as transformers' get_cosine_schedule_with_warmup (a test holds them equal), written
    here because importing that function imports transformers' trainer utilities, which import peft and
    bitsandbytes where they are installed (~146 MiB more resident memory, measured, and a warning).
    """
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def set_activation_checkpointing(model, on: bool) -> None:
    """Recompute each layer's forward in backward (non-reentrant), or stop doing so.

    transformers 5 calls it activation checkpointing and keeps `gradient_checkpointing_*` as deprecated
    aliases (with a warning); earlier versions have only those.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


# What `lorafit train --compile` uses: torch's default compiler, generating C++ on CPU and Triton on GPUs.
COMPILE_BACKEND = "inductor"


def check_compile(model, backend: str | Callable, device: torch.device) -> None:
    """Refuse in one line what would otherwise fail deep inside the first compiled step."""
    if output_head(model) is None:
        raise LorafitError(f"--compile: {type(model).__name__} has no separate body and output head that lorafit "
                           "can run apart (the loss runs the whole model); train it without --compile")
    if backend == "inductor" and device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise LorafitError("--compile on CPU needs a C++ compiler (g++ or clang++; or set CXX) for torch's "
                           "inductor backend; install one or train without --compile")


def compiled_body(model, backend: str | Callable, device: torch.device, echo) -> torch.nn.Module:
    """The model body under torch.compile, for the loss to run; the model itself stays as it was.

    Only the body: the output head is a few chunked matmuls the loss already does in place. The first
    step, and the first batch of a new shape (after which dimensions are compiled as dynamic), wait for
    the compiler. Measured on 2 CPU cores (bench/RESULTS-choices.md): 90 s + 78 s of compiling, then
    0.80 s per step instead of 0.87 s, so it pays only over thousands of steps.
    """
    check_compile(model, backend, device)
    echo(f"torch.compile ({backend}): the first step and each new batch shape wait for the compiler")
    return torch.compile(output_head(model).body, backend=backend)


def truncate_log(log_path: Path, step: int, echo=print) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be redone).

    A kill in the middle of a write leaves a half line; it is dropped, and said so, like any line that
    does not read as a step record.
    """
    if not log_path.exists():
        return
    kept, damaged = [], 0
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (ValueError, KeyError, TypeError, RecursionError):
            damaged += 1
            continue
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line)
    if damaged:
        echo(f"warning: {log_path}: {damaged} damaged line(s) dropped (a write cut off by a kill)")
    with atomic_path(log_path) as temporary:
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
