"""The training loop: one function, read top to bottom. No trainer framework.

AdamW over the trainable (adapter) parameters, linear warm-up then cosine decay, gradient clipping,
gradient accumulation with the loss weighted by label tokens across the whole optimizer step,
packed batches, a JSONL log of every step, periodic evaluation, atomic checkpoints, exact resume,
and a clean stop on SIGINT/SIGTERM (finish the step, checkpoint, say how to resume). Weights that
turn NaN/Inf stop the run at once, whatever `on_nonfinite` says: they are never checkpointed or saved.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from lorafit.errors import LorafitError
from lorafit.files import atomic_path
from lorafit.train.batching import (
    MIN_SHARED_PREFIX,
    collate_pieces,
    collate_shared_prefix,
    packing_is_exact,
    plan_batches,
    prefix_sharing_is_exact,
    shared_prefix_length,
)
from lorafit.train.checkpoint import Position, list_checkpoints, read_checkpoint, restore_checkpoint, save_checkpoint
from lorafit.train.loss import head_and_body, summed_token_loss


@dataclass
class LoopSettings:
    """What the loop needs to know; the CLI's TrainConfig fills it."""

    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    row_tokens: int = 128  # examples this long run alone (causal kernel); shorter ones are packed into rows this wide
    gradient_checkpointing: bool = False
    on_nonfinite: str = "stop"  # or "skip"
    b_lr_ratio: float = 1.0  # LoRA+: B's learning rate = ratio × A's
    compile_backend: str | Callable | None = None  # torch.compile the model body with this backend ("inductor")


@dataclass
class TrainResult:
    steps_done: int
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    real_tokens: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient, with on_nonfinite="skip"
    start_step: int = 0  # where this call started: 0, or the checkpoint's step when resumed


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _parameter_groups(model, settings: LoopSettings) -> tuple[list[dict], list[str]]:
    """Trainable parameters in a stable named order; LoRA+ puts lora_B in its own group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LorafitError("no trainable parameters: attach an adapter before training")
    if settings.b_lr_ratio == 1.0:
        return [{"params": [p for _, p in named], "lr": settings.lr}], [n for n, _ in named]
    is_b = {n for n, _ in named if ".lora_B." in n or ".lora_embedding_B." in n}
    b_named = [(n, p) for n, p in named if n in is_b]
    other = [(n, p) for n, p in named if n not in is_b]
    groups = [{"params": [p for _, p in other], "lr": settings.lr},
              {"params": [p for _, p in b_named], "lr": settings.lr * settings.b_lr_ratio}]
    return groups, [n for n, _ in other] + [n for n, _ in b_named]


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (adapters stay fp32); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _choose_collate(model, vocab_size: int, pad_id: int, settings: LoopSettings, echo) -> Callable:
    """The cheapest exact layout for each micro-batch, as a list of forward calls ("pieces").

    A prompt prefix shared by all rows computed once; else long examples alone and the short ones
    packed (padded when this model cannot keep packed examples apart).
    """
    packed = packing_is_exact(model, vocab_size)
    # Gradient checkpointing in transformers turns the key/value cache off, which the prefix path needs.
    shared = not settings.gradient_checkpointing and prefix_sharing_is_exact(model, vocab_size)
    echo(f"batches: examples of ≥ {settings.row_tokens} tokens run alone, shorter ones "
         + ("packed (no padding, examples kept apart)" if packed else "padded to the longest")
         + (", a prompt prefix shared by all rows computed once" if shared else ""))

    def collate(examples: list):
        if shared and len(examples) > 1:
            prefix = shared_prefix_length(examples)
            suffix_lengths = [len(e.input_ids) - prefix for e in examples]
            padding = len(examples) * max(suffix_lengths) - sum(suffix_lengths)
            if prefix >= MIN_SHARED_PREFIX and (len(examples) - 1) * prefix > padding:
                return [collate_shared_prefix(examples, pad_id, prefix)]
        return collate_pieces(examples, pad_id, settings.row_tokens, packed)

    return collate


def _set_activation_checkpointing(model, on: bool) -> None:
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
    if head_and_body(model)[1] is None:
        raise LorafitError("--compile: this model's logits are transformed after its output head, so the loss "
                           "runs the whole model; train it without --compile")
    if backend == "inductor" and device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise LorafitError("--compile on CPU needs a C++ compiler (g++ or clang++; or set CXX) for torch's "
                           "inductor backend; install one or train without --compile")


def _compiled_body(model, backend: str | Callable, device: torch.device, echo) -> torch.nn.Module:
    """The model body under torch.compile, for the loss to run; the model itself stays as it was.

    Only the body: the output head is a few chunked matmuls the loss already does in place. The first
    step, and the first batch of a new shape (after which dimensions are compiled as dynamic), wait for
    the compiler. Measured on 2 CPU cores (bench/RESULTS-choices.md): 90 s + 78 s of compiling, then
    0.80 s per step instead of 0.87 s, so it pays only over thousands of steps.
    """
    check_compile(model, backend, device)
    echo(f"torch.compile ({backend}): the first step and each new batch shape wait for the compiler")
    return torch.compile(head_and_body(model)[1], backend=backend)


def _micro_batches(lengths: list[int], settings: LoopSettings, position: Position):
    """Endless stream of (epoch, index-in-epoch, example indices), starting at `position`."""
    epoch, batch = position.epoch, position.batch
    while True:
        plan = plan_batches(lengths, settings.batch_size, settings.seed, epoch)
        for index in range(batch, len(plan)):
            yield epoch, index, plan[index]
        epoch, batch = epoch + 1, 0


def train(
    model,
    examples: list,
    settings: LoopSettings,
    run_dir: Path,
    *,
    pad_id: int,
    vocab_size: int,
    adapter_name: str = "default",
    evaluate: Callable[[], dict] | None = None,
    resume: Path | None = None,
    base_model: dict | None = None,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train the model's trainable parameters on tokenised `examples`; checkpoints go to run_dir/checkpoints.

    `resume` is a checkpoint folder to continue from; `base_model` (lorafit.identity) is recorded in
    every checkpoint's adapter so it names the model it was made for.
    """
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    groups, parameter_names = _parameter_groups(model, settings)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    position = Position()
    if resume is not None:
        position = restore_checkpoint(read_checkpoint(resume), model, optimizer, scheduler, parameter_names)
        echo(f"resumed from {resume} at step {position.step}")
    collate = _choose_collate(model, vocab_size, pad_id, settings, echo)
    body = _compiled_body(model, settings.compile_backend, device, echo) if settings.compile_backend else None
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.jsonl"
    _truncate_log(log_path, position.step, echo)
    if settings.gradient_checkpointing:
        _set_activation_checkpointing(model, True)
    try:
        return _run_steps(model, examples, settings, run_dir, device, optimizer, scheduler, parameters,
                          parameter_names, position, collate, body, adapter_name, evaluate, base_model, echo)
    finally:  # also after an error: the caller's model must not stay in checkpointing mode
        if settings.gradient_checkpointing:
            _set_activation_checkpointing(model, False)
        model.eval()


def _nonfinite_weights(parameters: list[torch.Tensor]) -> bool:
    """Whether any trainable weight is NaN/Inf: a NaN or an Inf anywhere makes its tensor's sum non-finite.

    One sum per tensor and one check (~4 ms per step for 420 adapter tensors on 2 CPU cores, <0.5% of a step).
    """
    with torch.no_grad():
        return not bool(torch.isfinite(torch.stack([p.sum() for p in parameters])).all())


def _run_steps(model, examples, settings, run_dir, device, optimizer, scheduler, parameters, parameter_names,
               position, collate, body, adapter_name, evaluate, base_model, echo) -> TrainResult:
    """The steps from `position` to settings.steps: the body of `train`, read top to bottom."""
    checkpoints = run_dir / "checkpoints"
    first_step = position.step
    stream = _micro_batches([len(e.input_ids) for e in examples], settings, position)
    result = TrainResult(steps_done=position.step, start_step=position.step)
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=position.step, desc="train", unit="step", dynamic_ncols=True)
    with _StopRequest() as stop, (run_dir / "log.jsonl").open("a", encoding="utf-8") as log, bar:
        while position.step < settings.steps:
            step_started = time.perf_counter()
            micro = []
            for _ in range(settings.grad_accum):
                epoch, index, indices = next(stream)
                micro.extend(piece.to(device) for piece in collate([examples[i] for i in indices]))
                position.epoch, position.batch = epoch, index + 1
            label_tokens = sum(b.label_tokens for b in micro)
            real_tokens = sum(b.real_tokens for b in micro)
            if label_tokens == 0:  # build_dataset drops such examples; a hand-made list may not have
                raise LorafitError(f"step {position.step + 1}: the micro-batches hold no label tokens to train on")

            loss_sum = 0.0
            for batch in micro:
                with _autocast(device):
                    loss = summed_token_loss(model, batch, body=body)
                (loss / label_tokens).backward()  # every label token weighs the same across the step
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm).item()
            step_loss = loss_sum / label_tokens

            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                if _nonfinite_weights(parameters):
                    raise LorafitError(f"step {position.step} made the adapter's weights NaN/Inf (lr "
                                       f"{optimizer.param_groups[0]['lr']:.3g}); stopped without saving them. Last "
                                       f"good checkpoint: {_last_checkpoint(checkpoints)}; lower --lr")
                seconds = time.perf_counter() - step_started
                record = {"step": position.step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "tokens": real_tokens, "label_tokens": label_tokens,
                          "tokens_per_s": real_tokens / seconds, "seconds": seconds}
                result.losses.append(step_loss)
                result.real_tokens += real_tokens
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{real_tokens / seconds:.0f}")
            else:
                optimizer.zero_grad(set_to_none=True)
                what = f"step {position.step + 1}: loss {step_loss}, gradient norm {grad_norm}"
                if settings.on_nonfinite != "skip":
                    raise LorafitError(f"non-finite {what}; stopped. Last good checkpoint: "
                                       f"{_last_checkpoint(checkpoints)} (lower --lr, or --on-nonfinite skip)")
                echo(f"skipped {what}")
                position.step += 1
                result.skipped_steps += 1
                with warnings.catch_warnings():  # the schedule follows steps, taken or skipped
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                record = {"step": position.step, "skipped": f"loss {step_loss}, gradient norm {grad_norm}"}
            bar.update(1)

            finished = position.step == settings.steps
            if finished and result.skipped_steps == position.step - first_step:
                raise LorafitError(f"every step of this run ({result.skipped_steps}) had a non-finite loss or "
                                   "gradient, so nothing was learned and no adapter is saved; lower --lr")
            if evaluate is not None and (finished or (settings.eval_every and position.step % settings.eval_every == 0)):
                model.eval()
                metrics = evaluate()
                model.train()
                record["eval"] = metrics
                result.evals.append({"step": position.step, **metrics})
                bar.write(f"step {position.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            log.write(json.dumps(record) + "\n")
            log.flush()

            if finished or stop.requested or (settings.save_every and position.step % settings.save_every == 0):
                save_checkpoint(checkpoints, position, model, adapter_name, optimizer, scheduler,
                                parameter_names, settings.keep_checkpoints, base_model=base_model)
                if stop.requested:
                    result.interrupted = True
                    bar.write(f"interrupted at step {position.step}: checkpoint written; "
                              f"continue with --resume {run_dir}")
                    break
    result.steps_done = position.step
    result.seconds = time.perf_counter() - started
    return result


def _last_checkpoint(folder: Path) -> str:
    found = list_checkpoints(folder)
    return str(found[-1]) if found else "none"


def _truncate_log(log_path: Path, step: int, echo=print) -> None:
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
