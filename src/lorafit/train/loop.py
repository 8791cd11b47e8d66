"""The training loop: one function, read top to bottom. No trainer framework.

AdamW over the trainable (adapter) parameters, linear warm-up then cosine decay, gradient clipping,
gradient accumulation with the loss weighted by label tokens across the whole optimizer step,
packed batches, a JSONL log of every step, periodic evaluation, atomic checkpoints, exact resume,
and a clean stop on SIGINT/SIGTERM (finish the step, checkpoint, say how to resume). Weights that
turn NaN/Inf stop the run at once, whatever `on_nonfinite` says: they are never checkpointed or saved.

`train` is setup (`setup_training`), the loop, and teardown; one optimizer step is
`lorafit.train.step.train_step`, which bench/sides.py runs too, so the benchmark measures the loop's own step.
Under torchrun each process runs this same loop on its share of every step (lorafit.train.distributed);
rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from lorafit.data.prepared import example_lengths
from lorafit.errors import LorafitError
from lorafit.heap import release_freed_memory
from lorafit.train.attention import use_fp32_attention
from lorafit.train.batching import Batch, plan_batches
from lorafit.train.checkpoint import Position, list_checkpoints, save_checkpoint
from lorafit.train.distributed import Ranks, any_rank, share
from lorafit.train.setup import (
    COMPILE_BACKEND,
    TrainingSetup,
    check_compile,
    set_activation_checkpointing,
    setup_training,
)
from lorafit.train.step import StepResult, train_step, weights_are_finite

__all__ = ["COMPILE_BACKEND", "LoopSettings", "TrainResult", "check_compile", "train"]


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
    lr_ratios: dict = field(default_factory=dict)  # parameter-dict name -> lr multiplier (LoRA+: lora_B)
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


def train(model, examples: list, settings: LoopSettings, run_dir: Path, *, pad_id: int, vocab_size: int,
          adapter_name: str = "default", evaluate: Callable[[], dict] | None = None, resume: Path | None = None,
          base_model: dict | None = None, echo: Callable[[str], None] = print, ranks: Ranks | None = None,
          ) -> TrainResult:
    """Train the model's trainable parameters on tokenised `examples`; checkpoints go to run_dir/checkpoints.

    `resume` is a checkpoint folder to continue from; `base_model` (lorafit.models.identity) is recorded in
    every checkpoint's adapter so it names the model it was made for. `ranks`: under torchrun, this
    process's place (lorafit.train.distributed): it trains on its share of every step, and only rank 0
    writes the log, the checkpoints and the progress bar.
    """
    main = ranks is None or ranks.is_main
    sharded = ranks is not None and ranks.sharded_base  # FSDP2: every rank runs every forward call, evaluation too
    run = setup_training(model, settings, run_dir, pad_id=pad_id, vocab_size=vocab_size, resume=resume, echo=echo,
                         writes=main, same_calls_everywhere=sharded)
    position, checkpoints = run.position, run_dir / "checkpoints"
    stream = _micro_batches(example_lengths(examples), settings, position)
    result = TrainResult(steps_done=position.step, start_step=position.step)
    if settings.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    started = time.perf_counter()
    previous_attention = use_fp32_attention(model)  # bf16 on CPU: attention in fp32 (train/attention.py)
    try:
        model.train()
        bar = tqdm(total=settings.steps, initial=position.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not main)
        log_file = (run_dir / "log.jsonl").open("a", encoding="utf-8") if main else contextlib.nullcontext(_NoLog())
        with _StopRequest() as stop, log_file as log, bar:
            while position.step < settings.steps:
                step_started = time.perf_counter()
                micro = _next_micro_batches(stream, examples, run.collate, settings.grad_accum, position, ranks)
                step = train_step(model, micro, run.parameters, run.optimizer, settings.max_grad_norm,
                                  run.scheduler, body=run.body, ranks=ranks, gradients=run.gradients)
                position.step += 1
                record = _account(step, run, settings, position.step, step_started, result, checkpoints, echo)
                bar.update(1)
                if step.applied:
                    bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

                finished = position.step == settings.steps
                if finished and result.skipped_steps == position.step - result.start_step:
                    raise LorafitError(f"every step of this run ({result.skipped_steps}) had a non-finite loss or "
                                       "gradient, so nothing was learned and no adapter is saved; lower --lr")
                if evaluate is not None and (main or sharded) and (finished or _due(settings.eval_every, position.step)):
                    record["eval"] = _evaluate(model, evaluate, position.step, result, bar if main else None)
                log.write(json.dumps(record) + "\n")
                log.flush()

                stopping = any_rank(stop.requested, ranks)  # every rank stops after the same step
                if finished or stopping or _due(settings.save_every, position.step):
                    if main:
                        save_checkpoint(checkpoints, position, model, adapter_name, run.optimizer, run.scheduler,
                                        run.parameter_names, settings.keep_checkpoints, base_model=base_model)
                    if stopping:
                        result.interrupted = True
                        if main:
                            bar.write(f"interrupted at step {position.step}: checkpoint written; "
                                      f"continue with --resume {run_dir}")
                        break
    finally:  # also after an error: the caller's model must not stay in checkpointing (or training) mode
        if settings.gradient_checkpointing:
            set_activation_checkpointing(model, False)
        model.eval()
        if previous_attention is not None:
            model.set_attn_implementation(previous_attention)
    result.steps_done = position.step
    result.seconds = time.perf_counter() - started
    return result


# The loop's steps in parts: what each one reads and writes, in the order the loop calls them.


def _micro_batches(lengths: list[int], settings: LoopSettings, position: Position):
    """Endless stream of (epoch, index-in-epoch, example indices), starting at `position`."""
    epoch, batch = position.epoch, position.batch
    while True:
        plan = plan_batches(lengths, settings.batch_size, settings.seed, epoch)
        for index in range(batch, len(plan)):
            yield epoch, index, plan[index]
        epoch, batch = epoch + 1, 0


def _next_micro_batches(stream, examples: list, collate: Callable, grad_accum: int, position: Position,
                        ranks: Ranks | None = None) -> list[Batch]:
    """The next step's `grad_accum` micro-batches as forward calls (this rank's share of each under torchrun);
    `position` moves past them."""
    micro = []
    for _ in range(grad_accum):
        epoch, index, indices = next(stream)
        mine = share(indices, ranks)
        if mine:
            micro.extend(collate([examples[i] for i in mine]))
        position.epoch, position.batch = epoch, index + 1
    # build_dataset drops examples without label tokens; a hand-made list may still hold a step of them
    if ranks is None and sum(piece.label_tokens for piece in micro) == 0:
        raise LorafitError(f"step {position.step + 1}: the micro-batches hold no label tokens to train on")
    return micro


def _account(step: StepResult, run: TrainingSetup, settings: LoopSettings, number: int, started: float,
             result: TrainResult, checkpoints: Path, echo) -> dict:
    """The step's log line, and its totals in `result`; weights made NaN/Inf stop the run, a non-finite step
    stops it too unless on_nonfinite="skip"."""
    if not step.applied:
        result.skipped_steps += 1
        return _skip_or_stop(step, number, settings.on_nonfinite, run.scheduler, checkpoints, echo)
    if not weights_are_finite(run.parameters):
        raise _nonfinite_weights_error(number, run.optimizer, checkpoints)
    result.losses.append(step.loss)
    result.real_tokens += step.real_tokens
    return _step_record(step, number, run.scheduler, time.perf_counter() - started)


def _nonfinite_weights_error(step: int, optimizer, checkpoints: Path) -> LorafitError:
    return LorafitError(f"step {step} made the adapter's weights NaN/Inf (lr {optimizer.param_groups[0]['lr']:.3g}); "
                        f"stopped without saving them. Last good checkpoint: {_last_checkpoint(checkpoints)}; "
                        "lower --lr")


def _step_record(step: StepResult, number: int, scheduler, seconds: float) -> dict:
    """The step's line in log.jsonl."""
    return {"step": number, "loss": step.loss, "lr": scheduler.get_last_lr()[0], "grad_norm": step.grad_norm,
            "tokens": step.real_tokens, "label_tokens": step.label_tokens,
            "tokens_per_s": step.real_tokens / seconds, "seconds": seconds}


def _skip_or_stop(step: StepResult, number: int, on_nonfinite: str, scheduler, checkpoints: Path, echo) -> dict:
    """A non-finite step: stop the run (the default), or skip it and return its log line."""
    what = f"step {number}: loss {step.loss}, gradient norm {step.grad_norm}"
    if on_nonfinite != "skip":
        raise LorafitError(f"non-finite {what}; stopped. Last good checkpoint: {_last_checkpoint(checkpoints)} "
                           "(lower --lr, or --on-nonfinite skip)")
    echo(f"skipped {what}")
    with warnings.catch_warnings():  # the schedule follows steps, taken or skipped
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return {"step": number, "skipped": f"loss {step.loss}, gradient norm {step.grad_norm}"}


def _due(every: int, step: int) -> bool:
    """Is `step` one of the periodic ones (eval_every, save_every; 0: none)?"""
    return bool(every) and step % every == 0


def _evaluate(model, evaluate: Callable[[], dict], step: int, result: TrainResult, bar) -> dict:
    """Run `evaluate` in eval mode, back to training after; record and print its metrics."""
    model.eval()
    metrics = evaluate()
    model.train()
    release_freed_memory()  # generation's freed blocks would otherwise stay resident through training
    result.evals.append({"step": step, **metrics})
    if bar is not None:
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


# The building blocks of setup and of the loop.


class _NoLog:
    """The step log of a rank that does not write one."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


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


def _last_checkpoint(folder: Path) -> str:
    found = list_checkpoints(folder)
    return str(found[-1]) if found else "none"


