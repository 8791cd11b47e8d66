"""`lorafit train`'s job, phase by phase: what the command runs, and what a notebook can run the same way.

    from lorafit.recipes.train import run_training
    from lorafit.recipes.train_settings import TrainConfig
    metrics = run_training(TrainConfig(data="data.jsonl", steps=200))

The order of the phases (`TrainingJob.run`) is the promise to the user's files: every setting is checked,
the data and the model are loaded and the adapter attached (which checks targets and rank) before the run
folder is touched, so a failed start leaves an earlier run exactly as it was (train/run_folder.py says what
--overwrite may replace). `--resume RUN` takes the run's own settings from RUN/config.yaml and refuses flags
that would change them (recipes/run_start.py). Launching several processes (`--nproc`) is recipes/launch.py.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import yaml

from lorafit.data.tasks import BUILTIN
from lorafit.errors import LorafitError
from lorafit.files import write_json, write_text
from lorafit.recipes.run_start import (
    REPORT_KEY,
    RunStart,
    absolute,
    check_resume_length,
    check_same_base,
    check_same_inputs,
    read_run_settings,
    start_or_resume,
)
from lorafit.recipes.train_settings import (
    DEFAULT_LR,
    PATH_SETTINGS,
    TrainConfig,
    adapter_config,
    check_settings,
    given_settings,
    learning_rate_ratios,
)
from lorafit.train import run_folder
from lorafit.version import __version__


def run_training(config: TrainConfig, echo=print, given: Optional[set[str]] = None) -> dict:
    """The whole `lorafit train` job; returns the metrics it printed (also written to <run>/metrics.json).

    `given`: the settings the user named (the CLI passes what was typed; by default those that differ from
    their defaults). With `nproc` > 1 the same job runs in that many processes (recipes/launch.py).
    """
    from lorafit.recipes.launch import joined_process_group, launch_torchrun
    from lorafit.train.distributed import launched_by_torchrun

    given = given_settings(config) if given is None else set(given)
    check_settings(config, given)
    if config.nproc is not None and config.nproc > 1 and not launched_by_torchrun():
        return launch_torchrun(config, given, echo)
    with joined_process_group(config) as ranks:
        return TrainingJob(config, given, echo, ranks).run()


class TrainingJob:
    """One `lorafit train` run in this process (under torchrun: this rank's part of it); `run` lists its phases."""

    def __init__(self, config: TrainConfig, given: set[str], echo, ranks) -> None:
        self.config, self.given, self.ranks = config, given, ranks
        self.main = ranks is None or ranks.is_main
        self.echo = echo if self.main else _silent  # rank 0 speaks for the run
        self.sharded = config.strategy == "fsdp"

    def run(self) -> dict:
        self.start()  # the run folder checked (or the resumed run read); nothing written
        self.read_data()  # before the model: a bad file fails in a second
        self.load_model()
        self.tokenize()
        self.plan_schedule()
        self.attach_adapter()  # checks targets and rank against the model: before any file is touched
        self.evaluate_before()
        self.write_run_start()  # only now, with everything checked and loaded, is the run folder written
        result = self.train()
        return self.finish(result)

    # -- the phases, in order ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the run folder, or read the resumed run (rank 0, which tells the others); resolve the dtype."""
        from lorafit.models.dtypes import choose_dtype
        from lorafit.train.distributed import check_under_torchrun, from_main
        from lorafit.train.fsdp import check_processes

        check_under_torchrun(self.config, self.ranks)
        if self.sharded:  # FSDP2 (lorafit.train.fsdp): every rank then makes every forward call, evaluation too
            check_processes(self.ranks)
            self.ranks = replace(self.ranks, sharded_base=True)
        start: RunStart = from_main(lambda: start_or_resume(self.config, self.given, self.echo), self.ranks)
        self.config, self.run_dir, self.resume = start.config, start.run_dir, start.checkpoint
        self.start_record = start
        why_dtype: list[str] = []
        if self.config.dtype is None:  # recorded resolved, so a resumed run (on any machine) keeps it
            self.config = replace(self.config, dtype=choose_dtype(None, why_dtype.append))
        self.echo("settings:\n" + _yaml(asdict(self.config)).rstrip())
        for line in why_dtype:
            self.echo(line)

    def read_data(self) -> None:
        """--data and --eval-data opened, their columns checked and their bytes fingerprinted; no row read yet
        (recipes/train_data.py). On resume the fingerprints must be the run's."""
        from lorafit.recipes.train_data import open_training_data

        split_given = "held_out" in self.given
        if self.resume is not None:  # the held-out set the run started with: a DatasetDict's split, or a split of it
            split_given = ((self.start_record.record or {}).get("eval_data") is None) if not self.config.eval_data \
                else split_given
        self.data = open_training_data(self.config, split_given, self.echo)
        if self.resume is not None:
            check_same_inputs(self.start_record.record, self.data.fingerprints, self.run_dir)

    def load_model(self) -> None:
        """The base model and tokenizer as the settings say; on resume, checked to be the run's own base."""
        from lorafit.data.encoding import chat_template_record, describe_chat_template
        from lorafit.models.identity import base_identity
        from lorafit.models.loading import load_model_and_tokenizer
        from lorafit.models.options import quantize_settings
        from lorafit.models.quantize import report_quantization
        from lorafit.train.setup import COMPILE_BACKEND, check_compile

        config = self.config
        # under FSDP2 on GPUs the whole base is read into CPU memory; each GPU then receives its shard only
        self.model, self.tokenizer = load_model_and_tokenizer(
            absolute(config.model), dtype=config.dtype, device="cpu" if self.sharded else None,
            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code,
            quantize=quantize_settings(config.quantize, config.double_quant))
        model = self.model
        self.echo(f"model: {model.name_or_path} ({type(model).__name__}, {model.dtype}, {model.device})")
        self.chat_template = chat_template_record(self.tokenizer)
        self.echo(f"chat template: {describe_chat_template(self.chat_template)}")
        self.quantized = report_quantization(model, self.echo)
        self.identity = base_identity(model, config.model)
        if self.resume is not None:
            check_same_base(self.start_record.record, model, self.run_dir)
        if config.compile:
            check_compile(model, COMPILE_BACKEND, model.device)

    def tokenize(self) -> None:
        """Training examples and the held-out set (the same examples for loss and exact match): the data encoded
        in batches and cached (data/prepared.py), or the cached arrays reused."""
        from lorafit.data.tokenizing import render_example
        from lorafit.recipes.train_data import training_examples
        from lorafit.train.distributed import from_main

        made = {}

        def on_rank_zero() -> None:
            made["examples"] = training_examples(self.data, self.tokenizer, self.config, self.echo)

        # Under torchrun rank 0 prepares (and caches) the data first, and an error there stops every rank; the
        # others then read its cache instead of encoding the same data at the same time.
        from_main(on_rank_zero, self.ranks)
        if "examples" not in made:
            made["examples"] = training_examples(self.data, self.tokenizer, self.config, self.echo)
        self.train_set, self.held_set, self.eval_conversations = made["examples"]
        self.echo("one training example as the model sees it:\n" + render_example(self.tokenizer, self.train_set[0]))

    def plan_schedule(self) -> None:
        """Batch size (planned for `auto`), steps, peak learning rate and warm-up."""
        config, builtin = self.config, self.config.data is None
        if config.batch_size == "auto":
            from lorafit.planner.auto_batch import auto_batch_size

            chosen = auto_batch_size(self.model, adapter_config(config), self.train_set, dtype=config.dtype,
                                     gradient_checkpointing=config.gradient_checkpointing,
                                     row_tokens=config.row_tokens, seed=config.seed,
                                     trust_remote_code=config.trust_remote_code, echo=self.echo)
            self.config = config = replace(config, batch_size=chosen)
        steps = config.steps or (BUILTIN.steps if builtin and not config.epochs else None)
        if steps is None:
            steps = steps_for_epochs(len(self.train_set), config.batch_size, config.grad_accum, config.epochs or 1.0)
        if self.resume is not None and config.steps is None:
            check_resume_length(self.run_dir, steps, self.resume.position.step, self.start_record.finished)
        self.steps = steps
        self.lr = config.lr or (BUILTIN.lr if builtin else DEFAULT_LR)
        self.warmup = config.warmup_steps if config.warmup_steps is not None else (
            BUILTIN.warmup_steps if builtin else round(0.05 * steps))
        self.echo(f"schedule: {steps} steps of {config.batch_size} × {config.grad_accum} examples, peak lr "
                  f"{self.lr:g}, {self.warmup} warm-up steps, then cosine decay")

    def attach_adapter(self) -> None:
        """The adapter the method's settings describe (seeded), and under fsdp the frozen base sharded."""
        import torch

        from lorafit.core.accounting import report
        from lorafit.core.adapters import attach
        from lorafit.train.fsdp import shard_frozen_base

        torch.manual_seed(self.config.seed)  # adapter initialisation
        attach(self.model, adapter_config(self.config))
        self.echo(report(self.model))
        if self.sharded:
            ranks = self.ranks
            device = torch.device("cuda", ranks.local_rank) if torch.cuda.is_available() else torch.device("cpu")
            layers = shard_frozen_base(self.model, ranks, device)
            self.echo(f"FSDP2: the frozen base sharded over {ranks.world_size} processes ({layers} decoder layers, "
                      "then the body); the adapter and the output head are whole on each; no shared-prompt-prefix "
                      "batches")

    def evaluate_before(self) -> None:
        """The base model's held-out scores: the adapter starts as the identity (B = 0, IA3 ones, BitFit zeros,
        PiSSA's residual + its part). Measured by rank 0 alone; under fsdp every rank takes part."""
        if self.resume is not None:
            self.before = self.start_record.saved_before
        else:
            self.before = self.held_out_metrics(with_generation=True) if self.main or self.sharded else {}
        if self.before:
            self.echo("held-out before training: " + _format(self.before))

    def write_run_start(self) -> None:
        """The resolved settings (and a new run's marker and metrics before training), written by rank 0."""
        config = self.config
        self.resolved = {**asdict(config), "steps": self.steps, "lr": self.lr, "warmup_steps": self.warmup,
                         "output": str(self.run_dir), "resume": None,
                         **{name: absolute(getattr(config, name)) for name in PATH_SETTINGS},
                         **({REPORT_KEY: self.quantized} if self.quantized else {})}
        if not self.main:
            return
        if self.resume is None:
            _write_new_run(self.run_dir, config, self.resolved, self.identity, self.before, self.data,
                           self.chat_template)
            return
        if self.resolved != {**read_run_settings(self.run_dir, keep_report=True), "resume": None}:
            write_text(self.run_dir / run_folder.CONFIG, _yaml(self.resolved))  # a longer run, other save/eval settings
        # in progress again: a kill before the end leaves a run that resume completes
        write_json(self.run_dir / run_folder.METRICS, {"before": self.before, "after": None}, sort_keys=False)

    def train(self):
        """The training loop (lorafit.train.loop) with this run's settings, data and held-out evaluation."""
        from lorafit.train.loop import LoopSettings, train
        from lorafit.train.setup import COMPILE_BACKEND

        config = self.config
        settings = LoopSettings(
            steps=self.steps, batch_size=config.batch_size, grad_accum=config.grad_accum, lr=self.lr,
            weight_decay=config.weight_decay, warmup_steps=self.warmup, max_grad_norm=config.max_grad_norm,
            seed=config.seed, eval_every=config.eval_every, save_every=config.save_every,
            keep_checkpoints=config.keep_checkpoints, gradient_checkpointing=config.gradient_checkpointing,
            on_nonfinite=config.on_nonfinite, row_tokens=config.row_tokens,
            compile_backend=COMPILE_BACKEND if config.compile else None, lr_ratios=learning_rate_ratios(config),
        )
        evaluate = (lambda: self.held_out_metrics(with_generation=False)) if self.held_set and config.eval_every \
            else None
        return train(self.model, self.train_set, settings, self.run_dir, pad_id=self.tokenizer.pad_token_id,
                     vocab_size=len(self.tokenizer), evaluate=evaluate,
                     resume=self.resume.path if self.resume is not None else None, base_model=self.identity,
                     echo=self.echo, ranks=self.ranks)

    def finish(self, result) -> dict:
        """Save the adapter and the loss curve, score the held-out set again, write and print the metrics."""
        from lorafit.formats.peft import save_adapter
        from lorafit.train.plot import plot_losses

        run_dir, echo = self.run_dir, self.echo
        if not self.main:
            if self.sharded and not result.interrupted:
                self.held_out_metrics(with_generation=True)  # its part of rank 0's evaluation's forward calls
            return {"rank": self.ranks.rank, "steps": result.steps_done}
        adapter_dir = save_adapter(self.model, run_dir / run_folder.ADAPTER,
                                   base_model_name_or_path=str(self.model.name_or_path), base_model=self.identity)
        plot_losses(run_dir / run_folder.LOG, run_dir / run_folder.PLOT)
        if result.interrupted:
            return {"interrupted": True, "steps": result.steps_done, "adapter": str(adapter_dir)}
        after = self.held_out_metrics(with_generation=True)
        metrics = {"before": self.before, "after": after, "steps": result.steps_done,
                   "resumed_at_step": result.start_step, "train_seconds": result.seconds,
                   "tokens_per_second": result.real_tokens / result.seconds if result.seconds else None,
                   "skipped_steps": result.skipped_steps, "held_out_examples": len(self.held_set),
                   "exact_match_examples": len(self.eval_conversations), "adapter": str(adapter_dir)}
        write_json(run_dir / run_folder.METRICS, metrics, sort_keys=False)
        if after:  # nothing scored (--held-out 0, --eval-examples 0): no empty line
            echo("held-out after training:  " + _format(after))
        if self.before and after:
            echo(_comparison(self.before, after))
        if result.skipped_steps:
            echo(f"warning: {result.skipped_steps} steps were skipped (non-finite loss or gradient); see "
                 f"{run_dir / run_folder.LOG}")
        steps_run = (f"{result.steps_done} steps" if not result.start_step else
                     f"steps {result.start_step + 1}-{result.steps_done} (resumed at step {result.start_step})")
        echo(f"trained {steps_run} in {result.seconds:.0f} s "
             f"({metrics['tokens_per_second'] or 0:.0f} tokens/s); adapter saved to {adapter_dir}")
        echo(f"loss curve: {run_dir / run_folder.PLOT}; step log: {run_dir / run_folder.LOG}")
        return metrics

    # -- what the phases share -----------------------------------------------------------------------------
    def held_out_metrics(self, with_generation: bool) -> dict:
        from lorafit.inference.evaluate import evaluate_loss, exact_match_accuracy

        metrics = evaluate_loss(self.model, self.held_set, self.tokenizer.pad_token_id) if self.held_set else {}
        if with_generation and self.eval_conversations:
            metrics.update(exact_match_accuracy(self.model, self.tokenizer, self.eval_conversations,
                                                self.config.max_new_tokens))
        return metrics


def steps_for_epochs(examples: int, batch_size: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `examples`; refused when one step would take more than one pass.

    A step is `grad_accum` micro-batches of `batch_size` examples. With more micro-batches per step than an
    epoch has (2 examples, --batch-size 1, --grad-accum 50), one step would cycle the data many times over,
    which is not the epoch count asked for.
    """
    micro_batches = -(-examples // batch_size)
    if grad_accum > micro_batches:
        raise LorafitError(
            f"one optimizer step is --grad-accum {grad_accum} micro-batches of --batch-size {batch_size}, but an epoch "
            f"of the {examples} training examples is {micro_batches} micro-batch{'es' if micro_batches > 1 else ''}: "
            f"one step would go over the data {grad_accum / micro_batches:g} times, not the {epochs:g} epoch"
            f"{'s' if epochs != 1 else ''} asked for. Lower --grad-accum to at most {micro_batches}, or give --steps")
    per_epoch = -(-micro_batches // grad_accum)
    return max(1, round(per_epoch * epochs))


def _write_new_run(run_dir: Path, config: TrainConfig, resolved: dict, identity: dict, before: dict, data,
                   chat_template: dict) -> None:
    """The first files of a new run: the marker first (so the folder is known as lorafit's), then the
    settings and the metrics before training. An earlier run there (--overwrite) is cleared just before."""
    if config.overwrite and run_dir.exists():
        run_folder.clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_folder.write_marker(run_dir, {
        "lorafit_version": __version__,
        "base_model": identity,
        "data": data.record("data") if config.data else {"builtin": "date task", "seed": config.seed},
        "eval_data": data.record("eval_data"),
        "chat_template": chat_template,  # eval and generate say when they would render with another
    })
    write_text(run_dir / run_folder.CONFIG, _yaml(resolved))
    write_json(run_dir / run_folder.METRICS, {"before": before, "after": None}, sort_keys=False)


def _silent(*_args, **_kwargs) -> None:
    pass


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


def _yaml(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False)
