"""`lorafit train`: fine-tune a causal LM with an adapter, show it learned, save the adapter.

With no arguments: the embedded SmolLM2-135M-Instruct on the built-in date task (rewrite a date in
ISO 8601), held-out exact match and loss printed before and after training.

The order of `run` is the promise to the user's files: every setting is checked, the data and the
model are loaded and the adapter attached (which checks targets and rank) before the run folder is
touched, so a failed start leaves an earlier run exactly as it was (train/run_folder.py says what
--overwrite may replace). `--resume RUN` takes the run's own settings from RUN/config.yaml and
refuses flags that would change them.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import yaml

from lorafit.commands.common import choose_dtype, report_quantization
from lorafit.commands.model_options import quantize_settings
from lorafit.commands.train_config import (
    DEFAULT_LR,
    PATH_SETTINGS,
    TrainConfig,
    adapter_config,
    check_settings,
    given_settings,
    learning_rate_ratios,
)
from lorafit.commands.train_resume import (
    REPORT_KEY,
    absolute,
    check_resume_length,
    check_same_base,
    check_same_inputs,
    read_run_settings,
    start_or_resume,
)
from lorafit.errors import LorafitError
from lorafit.files import write_json, write_text
from lorafit.tasks import BUILTIN
from lorafit.train import run_folder
from lorafit.train.run_folder import CONFIG
from lorafit.version import __version__

__all__ = ["TrainConfig", "run"]


def run(config: TrainConfig, echo=print, given: Optional[set[str]] = None) -> dict:
    """The whole job; returns the metrics it printed (also written to <run>/metrics.json)."""
    # torch and transformers load here, not at import, so `lorafit train --help` answers at once.
    import torch

    from lorafit.train import distributed

    given = given_settings(config) if given is None else set(given)
    check_settings(config, given)
    if config.nproc is not None and config.nproc > 1 and not distributed.launched_by_torchrun():
        return _launch_torchrun(config, given, echo)
    if distributed.launched_by_torchrun():
        _convert_before_joining(config)
    ranks = distributed.start("cuda" if torch.cuda.is_available() else "cpu", config.collective_timeout)
    try:
        return _run(config, given, echo, ranks)
    finally:
        distributed.stop()


def _run(config: TrainConfig, given: set[str], echo, ranks) -> dict:
    import torch

    from lorafit.accounting import report
    from lorafit.adapters import attach
    from lorafit.data import build_dataset, render_example
    from lorafit.evaluate import evaluate_loss, exact_match_accuracy
    from lorafit.identity import base_identity
    from lorafit.io import save_adapter
    from lorafit.models import load_model_and_tokenizer
    from lorafit.train.distributed import check_under_torchrun, from_main
    from lorafit.train.fsdp import check_processes, shard_frozen_base
    from lorafit.train.loop import COMPILE_BACKEND, LoopSettings, check_compile, train
    from lorafit.train.plot import plot_losses

    main = ranks is None or ranks.is_main
    if not main:
        echo = _silent  # rank 0 speaks for the run
    check_under_torchrun(config, ranks)
    sharded = config.strategy == "fsdp"
    if sharded:  # FSDP2 (lorafit.train.fsdp): every rank then makes every forward call, evaluation included
        check_processes(ranks)
        ranks = replace(ranks, sharded_base=True)
    # rank 0 checks the run folder (or reads the resumed run) and tells the others, or its error
    start = from_main(lambda: start_or_resume(config, given, echo), ranks)
    config, run_dir, resume = start.config, start.run_dir, start.checkpoint
    why_dtype: list[str] = []
    if config.dtype is None:  # recorded resolved, so a resumed run (on any machine) keeps it
        # runs recorded before lorafit chose the dtype itself have none there: they ran in float32
        config = replace(config, dtype="float32" if resume is not None else choose_dtype(None, why_dtype.append))
    builtin = config.data is None
    echo("settings:\n" + _yaml(asdict(config)).rstrip())
    for line in why_dtype:
        echo(line)
    train_chats, held_chats = _read_data(config, echo)  # before the model: a bad file fails in a second
    if resume is not None:
        check_same_inputs(start.record, config, run_dir)

    # under FSDP2 on GPUs the whole base is read into CPU memory; each GPU then receives its shard only
    model, tokenizer = load_model_and_tokenizer(absolute(config.model), dtype=config.dtype,
                                                device="cpu" if sharded else None,
                                                allow_pickle=config.allow_pickle,
                                                trust_remote_code=config.trust_remote_code,
                                                quantize=quantize_settings(config.quantize, config.double_quant))
    echo(f"model: {model.name_or_path} ({type(model).__name__}, {model.dtype}, {model.device})")
    quantized = report_quantization(model, echo)
    identity = base_identity(model, config.model)
    if resume is not None:
        check_same_base(start.record, model, run_dir)
    if config.compile:
        check_compile(model, COMPILE_BACKEND, model.device)
    train_set, stats = build_dataset(tokenizer, train_chats, config.max_length, config.train_on_prompt,
                                     config.overflow, source=config.data or "the built-in task")
    echo(stats.summary())
    for warning in stats.warnings():
        echo(f"warning: {warning}")
    held_set, eval_conversations = _held_out_set(tokenizer, held_chats, config, echo)
    echo("one training example as the model sees it:\n" + render_example(tokenizer, train_set[0]))

    if config.batch_size == "auto":
        config = replace(config, batch_size=_auto_batch_size(model, config, train_set, echo))
    steps = config.steps or (BUILTIN.steps if builtin and not config.epochs else None)
    if steps is None:
        per_epoch = -(-len(train_set) // (config.batch_size * config.grad_accum))
        steps = max(1, round(per_epoch * (config.epochs or 1.0)))
    if resume is not None and config.steps is None:
        check_resume_length(run_dir, steps, resume.position.step, start.finished)
    lr = config.lr or (BUILTIN.lr if builtin else DEFAULT_LR)
    warmup = config.warmup_steps if config.warmup_steps is not None else (
        BUILTIN.warmup_steps if builtin else round(0.05 * steps))
    echo(f"schedule: {steps} steps of {config.batch_size} × {config.grad_accum} examples, peak lr {lr:g}, "
         f"{warmup} warm-up steps, then cosine decay")

    torch.manual_seed(config.seed)  # adapter initialisation
    attach(model, adapter_config(config))  # checks targets and rank against the model: before any file is touched
    echo(report(model))
    if sharded:
        device = torch.device("cuda", ranks.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        layers = shard_frozen_base(model, ranks, device)
        echo(f"FSDP2: the frozen base sharded over {ranks.world_size} processes ({layers} decoder layers, then the "
             "body); the adapter and the output head are whole on each; no shared-prompt-prefix batches")
    pad_id = tokenizer.pad_token_id

    def held_out_metrics(with_generation: bool) -> dict:
        metrics = evaluate_loss(model, held_set, pad_id) if held_set else {}
        if with_generation and eval_conversations:
            metrics.update(exact_match_accuracy(model, tokenizer, eval_conversations, config.max_new_tokens))
        return metrics

    # The adapter starts as the identity (B = 0, IA3 ones, BitFit zeros, PiSSA's residual + its part), so
    # this is the base model's score (measured by rank 0 alone; under fsdp every rank takes part in it).
    before = (held_out_metrics(with_generation=True) if main or sharded else {}) if resume is None \
        else start.saved_before
    if before:
        echo("held-out before training: " + _format(before))

    # Only now, with everything checked and loaded, is the run folder written.
    resolved = {**asdict(config), "steps": steps, "lr": lr, "warmup_steps": warmup, "output": str(run_dir),
                "resume": None, **{name: absolute(getattr(config, name)) for name in PATH_SETTINGS},
                **({REPORT_KEY: quantized} if quantized else {})}
    if main and resume is None:
        _write_run_start(run_dir, config, resolved, identity, before)
    elif main:
        if resolved != {**read_run_settings(run_dir, keep_report=True), "resume": None}:
            write_text(run_dir / CONFIG, _yaml(resolved))  # a longer run, or other save/eval settings
        # in progress again: a kill before the end leaves a run that resume completes
        write_json(run_dir / run_folder.METRICS, {"before": before, "after": None}, sort_keys=False)

    settings = LoopSettings(
        steps=steps, batch_size=config.batch_size, grad_accum=config.grad_accum, lr=lr,
        weight_decay=config.weight_decay, warmup_steps=warmup, max_grad_norm=config.max_grad_norm, seed=config.seed,
        eval_every=config.eval_every, save_every=config.save_every, keep_checkpoints=config.keep_checkpoints,
        gradient_checkpointing=config.gradient_checkpointing, on_nonfinite=config.on_nonfinite,
        row_tokens=config.row_tokens, compile_backend=COMPILE_BACKEND if config.compile else None,
        lr_ratios=learning_rate_ratios(config),
    )
    result = train(model, train_set, settings, run_dir, pad_id=pad_id, vocab_size=len(tokenizer),
                   evaluate=(lambda: held_out_metrics(with_generation=False)) if held_set and config.eval_every else None,
                   resume=resume.path if resume is not None else None, base_model=identity, echo=echo,
                   ranks=ranks)
    if not main:
        if sharded and not result.interrupted:
            held_out_metrics(with_generation=True)  # its part of rank 0's evaluation's forward calls
        return {"rank": ranks.rank, "steps": result.steps_done}
    adapter_dir = save_adapter(model, run_dir / run_folder.ADAPTER, base_model_name_or_path=str(model.name_or_path),
                               base_model=identity)
    plot_losses(run_dir / run_folder.LOG, run_dir / run_folder.PLOT)
    if result.interrupted:
        return {"interrupted": True, "steps": result.steps_done, "adapter": str(adapter_dir)}

    after = held_out_metrics(with_generation=True)
    metrics = {"before": before, "after": after, "steps": result.steps_done, "resumed_at_step": result.start_step,
               "train_seconds": result.seconds,
               "tokens_per_second": result.real_tokens / result.seconds if result.seconds else None,
               "skipped_steps": result.skipped_steps, "held_out_examples": len(held_set),
               "exact_match_examples": len(eval_conversations), "adapter": str(adapter_dir)}
    write_json(run_dir / run_folder.METRICS, metrics, sort_keys=False)
    echo("held-out after training:  " + _format(after))
    if before:
        echo(_comparison(before, after))
    if result.skipped_steps:
        echo(f"warning: {result.skipped_steps} steps were skipped (non-finite loss or gradient); see {run_dir / 'log.jsonl'}")
    steps_run = (f"{result.steps_done} steps" if not result.start_step else
                 f"steps {result.start_step + 1}-{result.steps_done} (resumed at step {result.start_step})")
    echo(f"trained {steps_run} in {result.seconds:.0f} s "
         f"({metrics['tokens_per_second'] or 0:.0f} tokens/s); adapter saved to {adapter_dir}")
    echo(f"loss curve: {run_dir / 'loss.png'}; step log: {run_dir / 'log.jsonl'}")
    return metrics


def _convert_before_joining(config: TrainConfig) -> None:
    """Under torchrun, convert a .gguf base (the embedded default) into the cache before joining the others.

    Once the process group exists, transformers' save_pretrained writes on global rank 0 only, so a conversion
    made then leaves an empty folder on every other process (and on every other machine). Each process
    converts on its own instead (the first one to finish puts its folder in place; the cache is shared safely).
    The errors are left to the start proper, which reports them in one line on rank 0.
    """
    from lorafit.models import resolve_model_folder

    spec = config.model
    if spec is None and config.resume:
        try:
            spec = read_run_settings(Path(config.resume)).get("model")
        except (LorafitError, OSError, AttributeError):
            return
    try:
        resolve_model_folder(absolute(spec))
    except LorafitError:
        return


def _silent(*_args, **_kwargs) -> None:
    pass


def _launch_torchrun(config: TrainConfig, given: set[str], echo) -> dict:
    """--nproc N: the same command in N processes on this machine, started by torchrun (--standalone).

    The settings given travel as a YAML file (keys = flags), so the processes run exactly what was asked.
    """
    import subprocess
    import sys
    import tempfile

    settings = {name: getattr(config, name) for name in sorted(given)}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lorafit-nproc-", delete=False) as handle:
        handle.write(_yaml(settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.nproc}",
               "-m", "lorafit.cli", "train", "--config", handle.name]
    echo(f"--nproc {config.nproc}: {' '.join(command)}")
    try:
        done = subprocess.run(command, check=False)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise LorafitError(f"torchrun exited with code {done.returncode}; the failing rank's error is above")
    return {"nproc": config.nproc}


def _read_data(config: TrainConfig, echo) -> tuple[list, list]:
    """(training conversations, held-out conversations), with every ignored field reported."""
    from lorafit.data import read_examples, split_examples
    from lorafit.tasks import date_task_splits

    if config.data is None:
        train_chats, held_chats = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, config.seed)
        echo(f"data: built-in date task, {len(train_chats)} train / {len(held_chats)} held-out examples")
        return train_chats, held_chats
    files = [read_examples(config.data)] + ([read_examples(config.eval_data)] if config.eval_data else [])
    for note in (note for loaded in files for note in loaded.ignored):
        echo(f"warning: {note}")
    if config.eval_data:
        train_chats, held_chats = files[0].conversations, files[1].conversations
    else:
        held_out = int(config.held_out) if config.held_out >= 1 else config.held_out
        train_chats, held_chats = split_examples(files[0].conversations, held_out, config.seed)
    echo(f"data: {config.data}, {len(train_chats)} train / {len(held_chats)} held-out examples")
    return train_chats, held_chats


def _write_run_start(run_dir: Path, config: TrainConfig, resolved: dict, identity: dict, before: dict) -> None:
    """The first files of a new run: the marker first (so the folder is known as lorafit's), then the
    settings and the metrics before training. An earlier run there (--overwrite) is cleared just before."""
    from lorafit.identity import file_sha256

    if config.overwrite and run_dir.exists():
        run_folder.clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_folder.write_marker(run_dir, {
        "lorafit_version": __version__,
        "base_model": identity,
        "data": {"path": resolved["data"], "sha256": file_sha256(Path(config.data))} if config.data else
        {"builtin": "date task", "seed": config.seed},
        "eval_data": {"path": resolved["eval_data"], "sha256": file_sha256(Path(config.eval_data))}
        if config.eval_data else None,
    })
    write_text(run_dir / CONFIG, _yaml(resolved))
    write_json(run_dir / run_folder.METRICS, {"before": before, "after": None}, sort_keys=False)


def _held_out_set(tokenizer, held_chats: list, config: TrainConfig, echo) -> tuple[list, list]:
    """Held-out examples for both loss and exact match: the same ones, those that fit --max-length."""
    from lorafit.evaluate import held_out_set

    if not held_chats:
        return [], []
    source = config.eval_data or (f"the held-out part of {config.data}" if config.data else "the built-in task")
    held = held_out_set(tokenizer, held_chats, config.max_length, config.train_on_prompt, source)
    if held.left_out:
        echo(f"warning: {held.describe_left_out(config.max_length)}")
    return held.examples, held.conversations[: config.eval_examples]


def _format(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key.replace('_', ' ')} {value:.1%}" if key == "exact_match" else f"{key} {value:.4f}")
    return ", ".join(parts)


def _comparison(before: dict, after: dict) -> str:
    lines = [f"{'held-out':<14}{'before':>10}{'after':>10}"]
    for key in after:
        if key in before:
            show = (lambda v: f"{v:.1%}") if key == "exact_match" else (lambda v: f"{v:.4f}")
            lines.append(f"{key.replace('_', ' '):<14}{show(before[key]):>10}{show(after[key]):>10}")
    return "\n".join(lines)


def _auto_batch_size(model, config: TrainConfig, train_set: list, echo) -> int:
    """--batch-size auto: the planner's choice for this run's data (lorafit.planner.auto_batch)."""
    import torch

    from lorafit.planner.auto_batch import choose_batch_size, confirm_on_cuda
    from lorafit.planner.plan import Planner, Setup
    from lorafit.planner.runtime import layout_of
    from lorafit.quantize import quantization_of
    from lorafit.train.step import layout_collate

    quantize = quantization_of(model)
    device = next(model.parameters()).device
    from lorafit.models import parse_dtype

    setup = Setup(adapter_config(config), parse_dtype(config.dtype), quantize, config.gradient_checkpointing,
                  config.row_tokens, device.type)
    planner = Planner(model.config, setup, layout=layout_of(model.config, config.trust_remote_code),
                      trust_remote_code=config.trust_remote_code)
    batch = choose_batch_size(planner, train_set, config.seed, device, echo)
    if device.type == "cuda" and torch.cuda.is_available():
        from lorafit.adapters import attach, unload

        collate = layout_collate(0, config.row_tokens, packed=planner.packed, shared_prefix=planner.shared_prefix
                                 and not config.gradient_checkpointing)
        attach(model, adapter_config(config))
        try:
            batch = confirm_on_cuda(model, train_set, batch, config.seed, collate, echo)
        finally:
            unload(model)
    return batch


def _yaml(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False)
