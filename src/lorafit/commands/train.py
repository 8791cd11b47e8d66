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

import difflib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import yaml

from lorafit import __version__
from lorafit.config import ALL_LINEAR, BitFitConfig, IA3Config, LoraConfig
from lorafit.errors import LorafitError
from lorafit.files import write_json, write_text
from lorafit.train import run_folder
from lorafit.train.run_folder import CONFIG


@dataclass
class BuiltinTaskPreset:
    """Settings that make the built-in date task learn on 2 CPU cores in a few minutes (measured)."""

    train_examples: int = 2000
    held_out_examples: int = 100
    steps: int = 100
    lr: float = 2e-3
    warmup_steps: int = 10


BUILTIN = BuiltinTaskPreset()


@dataclass
class TrainConfig:
    """Fine-tune a causal language model with LoRA on instruction data."""

    model: Optional[str] = None
    """Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct, also named 'default')."""
    data: Optional[str] = None
    """JSONL/JSON instruction data: alpaca, chat messages, ShareGPT, prompt/completion or text records
    (default: the built-in date-rewriting task)."""
    eval_data: Optional[str] = None
    """Held-out data file (default: a split of --data)."""
    held_out: float = 0.05
    """Part of --data held out for evaluation when --eval-data is not given: a fraction in [0, 1) or a count
    (the built-in task holds out its own 100 examples)."""
    method: str = "lora"
    """Adapter method: lora, dora, ia3 or bitfit."""
    r: int = 8
    """LoRA/DoRA rank."""
    alpha: float = 16.0
    """LoRA/DoRA alpha (scaling alpha / r)."""
    dropout: float = 0.05
    """LoRA/DoRA dropout on the adapter input (the library's LoraConfig defaults to 0, which copies nothing; for
    training runs the CLI uses the 0.05 that peft's examples and the QLoRA paper use for small models)."""
    targets: Optional[str] = None
    """Comma-separated module names, 'all-linear', or a regex (default: the architecture's usual choice,
    q_proj,v_proj for Llama)."""
    use_rslora: bool = False
    """LoRA/DoRA: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r."""
    init: Literal["default", "gaussian", "pissa"] = "default"
    """LoRA/DoRA initialisation; pissa starts from the weights' top singular vectors."""
    lora_plus_ratio: float = 1.0
    """LoRA+: lora_B's learning rate is this times lora_A's (the paper suggests 16; 1 is plain LoRA)."""
    feedforward_targets: Optional[str] = None
    """IA3: comma-separated targets whose input is scaled (default: the architecture's, down_proj for Llama)."""
    add_missing_bias: bool = False
    """BitFit: give targets without a bias a zero-initialised one (Llama has none)."""
    train_head: bool = False
    """BitFit: also train the output head's weight (hidden × vocab parameters; its merge is refused when the head
    shares its weight with the input embeddings)."""
    steps: Optional[int] = None
    """Optimizer steps (default: one epoch; the built-in task uses its preset). With --resume: more steps than the
    run had continues it further (the cosine schedule then spans the new total)."""
    epochs: Optional[float] = None
    """Epochs over the training data (instead of --steps)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: Optional[float] = None
    """Peak learning rate (default 2e-4; the built-in task uses its preset)."""
    warmup_steps: Optional[int] = None
    """Linear warm-up steps before the cosine decay (default: 5% of the steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_length: int = 512
    """Longest example in tokens (held-out examples longer than this are left out of loss and exact match)."""
    overflow: Literal["truncate", "skip"] = "truncate"
    """What to do with longer training examples."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (default: loss on responses only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, more time."""
    compile: bool = False
    """torch.compile the model body (inductor): the first steps wait minutes for the compiler, then each step
    is a little faster (8% on 2 CPU cores); for runs of thousands of steps. On CPU it needs a C++ compiler."""
    row_tokens: int = 128
    """Examples at least this long run as their own forward call (no mask, causal attention kernel, memory
    freed piece by piece); shorter ones are packed into rows of this many tokens."""
    eval_every: int = 0
    """Held-out loss every N steps (0: only before and after)."""
    eval_examples: int = 100
    """Held-out examples used for exact match (greedy generation); 0 skips exact match."""
    max_new_tokens: int = 32
    """Generation length for exact match."""
    save_every: int = 50
    """Checkpoint every N steps, and at the end (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, newest first (at least 1: resuming needs one)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss or gradient: stop (keeping the last checkpoint) or skip the step. Weights that become
    NaN/Inf always stop the run and are never saved."""
    seed: int = 0
    """Random seed (data order, dropout, initialisation)."""
    output: Optional[str] = None
    """Run folder (default: runs/lorafit-<date>-<time>)."""
    resume: Optional[str] = None
    """Continue a run: its folder (the newest readable checkpoint) or one checkpoint folder. The run's settings
    come from its config.yaml; flags that would change them are refused."""
    overwrite: bool = False
    """Replace an earlier run in --output (only a folder lorafit made, holding only what it wrote)."""
    dtype: Optional[str] = None
    """Base model dtype: float32, bfloat16, float16 (default float32)."""
    allow_pickle: bool = False
    """Allow pickle (.bin) weights, which can run code when loaded."""
    trust_remote_code: bool = False
    """Run model code shipped with the model folder."""


METHODS = ("lora", "dora", "ia3", "bitfit")
DEFAULT_LR = 2e-4
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

# Settings that only some methods use: naming one with another method is refused, not ignored.
METHOD_SETTINGS = {
    "r": ("lora", "dora"), "alpha": ("lora", "dora"), "dropout": ("lora", "dora"), "use_rslora": ("lora", "dora"),
    "init": ("lora", "dora"), "lora_plus_ratio": ("lora", "dora"), "feedforward_targets": ("ia3",),
    "add_missing_bias": ("bitfit",), "train_head": ("bitfit",),
}
# What --resume takes from the command line; every other setting comes from the run's config.yaml.
RESUME_MAY_CHANGE = ("steps", "epochs", "eval_every", "eval_examples", "max_new_tokens", "save_every",
                     "keep_checkpoints", "on_nonfinite", "gradient_checkpointing", "compile", "row_tokens")
# Permissions are never taken from a file: a resumed run that needed them must be given them again.
PERMISSIONS = ("allow_pickle", "trust_remote_code")
PATH_SETTINGS = ("model", "data", "eval_data")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


FLOAT32_MAX = 3.4028234663852886e38


def _finite(value: float) -> bool:
    """Finite in float32 too: torch turns these settings into float32 tensors (1e39 overflows there)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def given_settings(config: TrainConfig) -> set[str]:
    """For library callers: the settings that differ from their defaults (the CLI passes what was typed)."""
    default = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) != getattr(default, f.name)}


def check_settings(config: TrainConfig, given: set[str]) -> None:
    """Refuse every setting that is out of range or does not apply, before anything is loaded."""
    if config.method not in METHODS:
        close = difflib.get_close_matches(config.method, METHODS, n=1)
        raise LorafitError(f"--method {config.method!r} is unknown" + (f" (did you mean {close[0]}?)" if close else "")
                           + f"; methods: {', '.join(METHODS)}")
    for name, methods in METHOD_SETTINGS.items():
        if name in given and config.method not in methods:
            raise LorafitError(f"{flag(name)} is a {'/'.join(m.upper() for m in methods)} setting; --method "
                               f"{config.method} does not use it")
    for name in ("r", "batch_size", "grad_accum", "max_new_tokens", "row_tokens", "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise LorafitError(f"{flag(name)} must be >= 1, got {getattr(config, name)}")
    if config.max_length < 2:
        raise LorafitError(f"--max-length must be >= 2, got {config.max_length}")
    for name in ("eval_examples", "warmup_steps", "eval_every", "save_every"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise LorafitError(f"{flag(name)} must be >= 0, got {value}")
    for name in ("lr", "epochs", "alpha", "max_grad_norm", "lora_plus_ratio"):
        value = getattr(config, name)
        if value is not None and not (_finite(value) and value > 0):
            raise LorafitError(f"{flag(name)} must be a finite number > 0, got {value}")
    if not (_finite(config.weight_decay) and config.weight_decay >= 0):
        raise LorafitError(f"--weight-decay must be a finite number >= 0, got {config.weight_decay}")
    if not 0 <= config.dropout < 1:  # also false for NaN
        raise LorafitError(f"--dropout must be in [0, 1), got {config.dropout}")
    if not (math.isfinite(config.held_out) and config.held_out >= 0
            and (config.held_out < 1 or float(config.held_out).is_integer())):
        raise LorafitError(f"--held-out must be a fraction in [0, 1) or a whole count, got {config.held_out}")
    if config.steps is not None and config.steps < 1:
        raise LorafitError(f"--steps must be > 0, got {config.steps}")
    if config.steps is not None and config.epochs is not None:
        raise LorafitError("give --steps or --epochs, not both")
    if config.dtype is not None and config.dtype.removeprefix("torch.") not in DTYPES:
        raise LorafitError(f"--dtype {config.dtype!r} is unknown; use float32, bfloat16 or float16")
    if config.data is None:
        if config.eval_data:
            raise LorafitError("--eval-data needs --data (the built-in task makes its own held-out split)")
        if "held_out" in given:
            raise LorafitError(f"--held-out applies to --data; the built-in task holds out its own "
                               f"{BUILTIN.held_out_examples} examples")
    if config.resume and config.overwrite:
        raise LorafitError("--overwrite replaces a run and --resume continues one: give one of them")


def parse_targets(text: Optional[str]):
    """--targets as the library takes it: None, 'all-linear', a regex, or a list of names."""
    if text is None or text == ALL_LINEAR:
        return text
    if any(ch in text for ch in "*()[]|\\^$+?"):
        return text  # a regex over full module paths
    return [name.strip() for name in text.split(",") if name.strip()]


def adapter_config(config: TrainConfig):
    """The library config that --method and its flags describe."""
    targets = parse_targets(config.targets)
    if config.method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=parse_targets(config.feedforward_targets))
    if config.method == "bitfit":
        return BitFitConfig(target_modules=targets, add_missing_bias=config.add_missing_bias,
                            train_head=config.train_head)
    return LoraConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=targets,
                      use_rslora=config.use_rslora, init=config.init, use_dora=config.method == "dora")


# -- resume ------------------------------------------------------------------------------------------------
def _absolute(value: Optional[str]) -> Optional[str]:
    if value is None or value == "default":
        return None
    return str(Path(value).expanduser().resolve())


def _locate_resume(resume: str) -> tuple[Path, Optional[Path]]:
    """(run folder, the checkpoint named, or None for the run's newest)."""
    path = Path(resume)
    if not path.exists():
        raise LorafitError(f"--resume {path}: no such folder")
    checkpoint = None
    if (path / "trainer_state.json").is_file():  # a checkpoint folder (train/checkpoint.py)
        checkpoint, path = path, path.parent.parent
    if not (path / CONFIG).is_file():
        raise LorafitError(f"--resume {resume}: not a lorafit run folder (no {path / CONFIG})")
    return path, checkpoint


def _read_run_settings(run: Path) -> dict:
    path = run / CONFIG
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise LorafitError(f"{path} is damaged ({str(err).splitlines()[0]}); the run's settings cannot be read") from None
    known = {f.name for f in fields(TrainConfig)}
    if not isinstance(saved, dict) or not set(saved) <= known:
        odd = sorted(set(saved) - known) if isinstance(saved, dict) else [type(saved).__name__]
        raise LorafitError(f"{path} is not a lorafit run's settings (unexpected: {', '.join(map(str, odd))})")
    return saved


def restore_run_settings(config: TrainConfig, given: set[str]) -> tuple[TrainConfig, Path, Optional[Path]]:
    """The settings the resumed run continues with: its config.yaml, plus only what may change.

    Returns (settings, run folder, the checkpoint named or None for the run's newest).
    """
    run, checkpoint = _locate_resume(config.resume)
    saved = _read_run_settings(run)
    conflicts = []
    for name in sorted(given - set(RESUME_MAY_CHANGE) - set(PERMISSIONS) - {"resume", "output", "overwrite"}):
        now, then = getattr(config, name), saved.get(name)
        if name in PATH_SETTINGS:
            now, then = _absolute(now), _absolute(then)
        if now != then:
            conflicts.append(f"{flag(name)} {now} now, {then} in the run")
    if conflicts:
        raise LorafitError(f"--resume {run} continues with the run's own settings ({run / 'config.yaml'}); these "
                           f"differ: {'; '.join(conflicts)}. Drop them, or start a new run with --output")
    if config.output and Path(config.output).resolve() != run.resolve():
        raise LorafitError(f"--resume continues in the run's own folder {run}; --output {config.output} does not apply")
    for name in PERMISSIONS:
        if saved.get(name) and not getattr(config, name):
            raise LorafitError(f"the run was started with {flag(name)}; pass it again to resume (permissions are "
                               "not taken from files)")
    restored = {**saved, "resume": config.resume, "output": str(run)}
    for name in RESUME_MAY_CHANGE + PERMISSIONS:
        if name in given:
            restored[name] = getattr(config, name)
    if "steps" in given or "epochs" in given:  # a new length replaces the resolved one
        restored["steps"], restored["epochs"] = config.steps, config.epochs
    else:
        restored["epochs"] = None  # config.yaml holds the resolved step count
    return TrainConfig(**restored), run, checkpoint


def _check_same_inputs(record: Optional[dict], config: TrainConfig, run: Path) -> None:
    """On resume, the data files must be the ones the run started from (their SHA-256 in the marker)."""
    from lorafit.identity import file_sha256

    if record is None:
        return
    for name in ("data", "eval_data"):
        entry = record.get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue
        path = getattr(config, name)
        if path is None or not Path(path).is_file():
            raise LorafitError(f"{flag(name)} {path}: the file the run was trained on is gone; resume needs it")
        if file_sha256(Path(path)) != entry["sha256"]:
            raise LorafitError(f"{flag(name)} {path} has changed since the run started (its SHA-256 differs from the "
                               f"one in {run / 'lorafit-run.json'}); resume needs the same data, or start a new run")


# -- the job -----------------------------------------------------------------------------------------------
def run(config: TrainConfig, echo=print, given: Optional[set[str]] = None) -> dict:
    """The whole job; returns the metrics it printed (also written to <run>/metrics.json)."""
    # torch and transformers load here, not at import, so `lorafit train --help` answers at once.
    import torch

    from lorafit.accounting import report
    from lorafit.adapters import attach
    from lorafit.data import build_dataset, render_example
    from lorafit.evaluate import evaluate_loss, exact_match_accuracy
    from lorafit.identity import base_identity
    from lorafit.io import save_adapter
    from lorafit.models import load_model_and_tokenizer
    from lorafit.train.loop import COMPILE_BACKEND, LoopSettings, check_compile, train
    from lorafit.train.plot import plot_losses

    given = given_settings(config) if given is None else set(given)
    check_settings(config, given)
    start = _start_or_resume(config, given, echo)
    config, run_dir, resume = start.config, start.run_dir, start.checkpoint
    builtin = config.data is None
    echo("settings:\n" + _yaml(asdict(config)).rstrip())
    train_chats, held_chats = _read_data(config, echo)  # before the model: a bad file fails in a second
    if resume is not None:
        _check_same_inputs(start.record, config, run_dir)

    model, tokenizer = load_model_and_tokenizer(_absolute(config.model), dtype=config.dtype,
                                                allow_pickle=config.allow_pickle,
                                                trust_remote_code=config.trust_remote_code)
    echo(f"model: {model.name_or_path} ({type(model).__name__}, {model.dtype}, {model.device})")
    identity = base_identity(model, config.model)
    if resume is not None:
        _check_same_base(start.record, model, run_dir)
    if config.compile:
        check_compile(model, COMPILE_BACKEND, model.device)
    train_set, stats = build_dataset(tokenizer, train_chats, config.max_length, config.train_on_prompt,
                                     config.overflow, source=config.data or "the built-in task")
    echo(stats.summary())
    for warning in stats.warnings():
        echo(f"warning: {warning}")
    held_set, eval_conversations = _held_out_set(tokenizer, held_chats, config, echo)
    echo("one training example as the model sees it:\n" + render_example(tokenizer, train_set[0]))

    steps = config.steps or (BUILTIN.steps if builtin and not config.epochs else None)
    if steps is None:
        per_epoch = -(-len(train_set) // (config.batch_size * config.grad_accum))
        steps = max(1, round(per_epoch * (config.epochs or 1.0)))
    if resume is not None and config.steps is None:
        _check_resume_length(run_dir, steps, resume.position.step, start.finished)
    lr = config.lr or (BUILTIN.lr if builtin else DEFAULT_LR)
    warmup = config.warmup_steps if config.warmup_steps is not None else (
        BUILTIN.warmup_steps if builtin else round(0.05 * steps))
    echo(f"schedule: {steps} steps of {config.batch_size} × {config.grad_accum} examples, peak lr {lr:g}, "
         f"{warmup} warm-up steps, then cosine decay")

    torch.manual_seed(config.seed)  # adapter initialisation
    attach(model, adapter_config(config))  # checks targets and rank against the model: before any file is touched
    echo(report(model))
    pad_id = tokenizer.pad_token_id

    def held_out_metrics(with_generation: bool) -> dict:
        metrics = evaluate_loss(model, held_set, pad_id) if held_set else {}
        if with_generation and eval_conversations:
            metrics.update(exact_match_accuracy(model, tokenizer, eval_conversations, config.max_new_tokens))
        return metrics

    # The adapter starts as the identity (B = 0, IA3 ones, BitFit zeros, PiSSA's residual + its part), so
    # this is the base model's score.
    before = held_out_metrics(with_generation=True) if resume is None else start.saved_before
    if before:
        echo("held-out before training: " + _format(before))

    # Only now, with everything checked and loaded, is the run folder written.
    resolved = {**asdict(config), "steps": steps, "lr": lr, "warmup_steps": warmup, "output": str(run_dir),
                "resume": None, **{name: _absolute(getattr(config, name)) for name in PATH_SETTINGS}}
    if resume is None:
        _write_run_start(run_dir, config, resolved, identity, before)
    else:
        if resolved != {**_read_run_settings(run_dir), "resume": None}:
            write_text(run_dir / CONFIG, _yaml(resolved))  # a longer run, or other save/eval settings
        # in progress again: a kill before the end leaves a run that resume completes
        write_json(run_dir / run_folder.METRICS, {"before": before, "after": None}, sort_keys=False)

    settings = LoopSettings(
        steps=steps, batch_size=config.batch_size, grad_accum=config.grad_accum, lr=lr,
        weight_decay=config.weight_decay, warmup_steps=warmup, max_grad_norm=config.max_grad_norm, seed=config.seed,
        eval_every=config.eval_every, save_every=config.save_every, keep_checkpoints=config.keep_checkpoints,
        gradient_checkpointing=config.gradient_checkpointing, on_nonfinite=config.on_nonfinite,
        row_tokens=config.row_tokens, compile_backend=COMPILE_BACKEND if config.compile else None,
        b_lr_ratio=config.lora_plus_ratio,
    )
    result = train(model, train_set, settings, run_dir, pad_id=pad_id, vocab_size=len(tokenizer),
                   evaluate=(lambda: held_out_metrics(with_generation=False)) if held_set and config.eval_every else None,
                   resume=resume.path if resume is not None else None, base_model=identity, echo=echo)
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


@dataclass
class RunStart:
    """Where a run starts: its settings, folder and, when resumed, the checkpoint and what the run recorded."""

    config: TrainConfig
    run_dir: Path
    checkpoint: object = None  # train.checkpoint.CheckpointState when resuming
    record: Optional[dict] = None  # the run's lorafit-run.json
    saved_before: Optional[dict] = None  # its held-out metrics before training
    finished: bool = False  # its metrics.json has the after-training metrics


def _start_or_resume(config: TrainConfig, given: set[str], echo) -> RunStart:
    """A new run's checked output folder, or the resumed run's settings and checkpoint; writes nothing."""
    from lorafit.train.checkpoint import newest_readable, read_checkpoint

    if not config.resume:
        run_dir = Path(config.output) if config.output else Path("runs") / time.strftime("lorafit-%Y%m%d-%H%M%S")
        inputs = {"--data": config.data, "--eval-data": config.eval_data, "--model": _absolute(config.model)}
        run_folder.check_output(run_dir, overwrite=config.overwrite, inputs=inputs)
        return RunStart(config, run_dir)
    config, run_dir, named_checkpoint = restore_run_settings(config, given)
    check_settings(config, set())
    checkpoint = read_checkpoint(named_checkpoint) if named_checkpoint else newest_readable(
        run_dir / run_folder.CHECKPOINTS, echo)
    if checkpoint is None:
        raise LorafitError(f"--resume {run_dir}: no readable checkpoint in {run_dir / run_folder.CHECKPOINTS}")
    run_folder.check_writable(run_dir)
    saved_before, finished = _read_run_metrics(run_dir / run_folder.METRICS)
    if config.steps is not None:
        _check_resume_length(run_dir, config.steps, checkpoint.position.step, finished)
    return RunStart(config, run_dir, checkpoint, run_folder.read_marker(run_dir), saved_before, finished)


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


def _check_same_base(record: Optional[dict], model, run_dir: Path) -> None:
    """On resume, the model loaded must be the base the run was trained on (lorafit.identity)."""
    from lorafit.identity import mismatch

    recorded = (record or {}).get("base_model")
    if not isinstance(recorded, dict):
        return  # a run of lorafit 0.1 recorded none
    differs = mismatch(recorded.get("fingerprint") or {}, model)
    if differs:
        raise LorafitError(f"--resume {run_dir}: the run was trained on {recorded.get('model')}, and the model "
                           f"loaded now is not that one ({differs})")


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


def _read_run_metrics(path: Path) -> tuple[Optional[dict], bool]:
    """(the held-out metrics measured when the run started, whether it finished: its "after" is written)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None, False
    if not isinstance(metrics, dict):
        return None, False
    before = metrics.get("before")
    return (before if isinstance(before, dict) else None), isinstance(metrics.get("after"), dict)


def _check_resume_length(run_dir: Path, steps: int, at: int, finished: bool) -> None:
    """A resumed run must have steps left, or be one that stopped between its last checkpoint and its end."""
    if steps > at or (steps == at and not finished):
        return
    if steps == at:
        raise LorafitError(f"--resume {run_dir}: the run is finished (step {at} of {steps}); pass --steps N with "
                           f"N > {at} to train further")
    raise LorafitError(f"--resume {run_dir}: the checkpoint is at step {at}, beyond {steps} steps; pass --steps N "
                       f"with N > {at}")


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
