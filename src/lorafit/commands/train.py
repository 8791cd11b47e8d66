"""`lorafit train`: fine-tune a causal LM with an adapter, show it learned, save the adapter.

With no arguments: the embedded SmolLM2-135M-Instruct on the built-in date task (rewrite a date in
ISO 8601), held-out exact match and loss printed before and after training.
"""

from __future__ import annotations

import difflib
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import torch

from lorafit.accounting import report
from lorafit.adapters import attach
from lorafit.config import ALL_LINEAR, BitFitConfig, IA3Config, LoraConfig
from lorafit.data import build_dataset, load_examples, render_example, split_examples
from lorafit.errors import LorafitError
from lorafit.evaluate import evaluate_loss, exact_match_accuracy
from lorafit.io import save_adapter
from lorafit.models import load_model_and_tokenizer
from lorafit.tasks import date_task_splits
from lorafit.train.checkpoint import list_checkpoints
from lorafit.train.loop import COMPILE_BACKEND, LoopSettings, check_compile, train
from lorafit.train.plot import plot_losses


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
    """Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)."""
    data: Optional[str] = None
    """JSONL/JSON instruction data: alpaca, chat messages, ShareGPT, prompt/completion or text records
    (default: the built-in date-rewriting task)."""
    eval_data: Optional[str] = None
    """Held-out data file (default: a split of --data)."""
    held_out: float = 0.05
    """Fraction of --data held out for evaluation when --eval-data is not given."""
    method: str = "lora"
    """Adapter method: lora, dora, ia3 or bitfit."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (scaling alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    targets: Optional[str] = None
    """Comma-separated module names, 'all-linear', or a regex (default: the architecture's usual choice,
    q_proj,v_proj for Llama)."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r."""
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
    """Optimizer steps (default: one epoch; the built-in task uses its preset)."""
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
    """Longest example in tokens."""
    overflow: Literal["truncate", "skip"] = "truncate"
    """What to do with longer examples."""
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
    """Held-out examples used for exact match (greedy generation)."""
    max_new_tokens: int = 32
    """Generation length for exact match."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss or gradient: stop (keeping the last checkpoint) or skip the step."""
    seed: int = 0
    """Random seed (data order, dropout, initialisation)."""
    output: Optional[str] = None
    """Run folder (default: runs/lorafit-<date>-<time>)."""
    resume: Optional[str] = None
    """Continue from a checkpoint folder or a run folder (its latest checkpoint)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    dtype: Optional[str] = None
    """Base model dtype: float32, bfloat16, float16 (default float32)."""
    allow_pickle: bool = False
    """Allow pickle (.bin) weights, which can run code when loaded."""
    trust_remote_code: bool = False
    """Run model code shipped with the model folder."""


METHODS = ("lora", "dora", "ia3", "bitfit")


def _check(config: TrainConfig) -> None:
    if config.method not in METHODS:
        close = difflib.get_close_matches(config.method, METHODS, n=1)
        raise LorafitError(f"--method {config.method!r} is unknown" + (f" (did you mean {close[0]}?)" if close else "")
                           + f"; methods: {', '.join(METHODS)}")
    positive = {"r": config.r, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                "max_length": config.max_length, "eval_examples": config.eval_examples,
                "max_new_tokens": config.max_new_tokens, "row_tokens": config.row_tokens}
    for name, value in positive.items():
        if value < 1:
            raise LorafitError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if config.method != "bitfit" and (config.add_missing_bias or config.train_head):
        flag = "--add-missing-bias" if config.add_missing_bias else "--train-head"
        raise LorafitError(f"{flag} is a BitFit setting; it needs --method bitfit (got --method {config.method})")
    if config.lora_plus_ratio <= 0:
        raise LorafitError(f"--lora-plus-ratio must be > 0, got {config.lora_plus_ratio}")
    for name in ("steps", "epochs", "lr"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise LorafitError(f"--{name} must be > 0, got {value}")
    if config.steps is not None and config.epochs is not None:
        raise LorafitError("give --steps or --epochs, not both")
    for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise LorafitError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if config.max_grad_norm <= 0 or config.weight_decay < 0:
        raise LorafitError("--max-grad-norm must be > 0 and --weight-decay >= 0")


def _targets(text: Optional[str]):
    if text is None or text == ALL_LINEAR:
        return text
    if any(ch in text for ch in "*()[]|\\^$+?"):
        return text  # a regex over full module paths
    return [name.strip() for name in text.split(",") if name.strip()]


def adapter_config(config: TrainConfig):
    """The library config that --method and its flags describe."""
    targets = _targets(config.targets)
    if config.method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=_targets(config.feedforward_targets))
    if config.method == "bitfit":
        return BitFitConfig(target_modules=targets, add_missing_bias=config.add_missing_bias,
                            train_head=config.train_head)
    return LoraConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=targets,
                      use_rslora=config.use_rslora, init=config.init, use_dora=config.method == "dora")


def _run_folder(config: TrainConfig) -> tuple[Path, Optional[Path]]:
    """The run folder and the checkpoint to resume from (refusing to clobber an existing run)."""
    if config.resume:
        resume = Path(config.resume)
        if not resume.exists():
            raise LorafitError(f"--resume {resume}: no such folder")
        if (resume / "trainer_state.json").is_file():
            checkpoint = resume
            run = resume.parent.parent
        else:
            found = list_checkpoints(resume / "checkpoints")
            if not found:
                raise LorafitError(f"--resume {resume}: no checkpoint in {resume / 'checkpoints'}")
            checkpoint, run = found[-1], resume
        return Path(config.output) if config.output else run, checkpoint
    run = Path(config.output) if config.output else Path("runs") / time.strftime("lorafit-%Y%m%d-%H%M%S")
    if run.exists() and any(run.iterdir()) and not config.overwrite:
        raise LorafitError(f"output folder {run} exists and is not empty; pass --overwrite, or --resume {run}")
    return run, None


def run(config: TrainConfig, echo=print) -> dict:
    """The whole job; returns the metrics it printed (also written to <run>/metrics.json)."""
    _check(config)
    builtin = config.data is None
    if builtin and config.eval_data:
        raise LorafitError("--eval-data needs --data (the built-in task makes its own held-out split)")
    run_dir, checkpoint = _run_folder(config)

    if builtin:
        train_chats, held_chats = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, config.seed)
        echo(f"data: built-in date task, {len(train_chats)} train / {len(held_chats)} held-out examples")
    else:
        chats = load_examples(config.data)
        if config.eval_data:
            train_chats, held_chats = chats, load_examples(config.eval_data)
        else:
            train_chats, held_chats = split_examples(chats, config.held_out, config.seed)
        echo(f"data: {config.data}, {len(train_chats)} train / {len(held_chats)} held-out examples")
    # The data is read before the model so a bad file fails in a second, not after a model load.
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype,
                                                allow_pickle=config.allow_pickle,
                                                trust_remote_code=config.trust_remote_code)
    echo(f"model: {model.name_or_path} ({type(model).__name__}, {model.dtype}, {model.device})")
    if config.compile:
        check_compile(model, COMPILE_BACKEND, model.device)
    train_set, stats = build_dataset(tokenizer, train_chats, config.max_length, config.train_on_prompt, config.overflow)
    held_set, _ = build_dataset(tokenizer, held_chats, config.max_length, config.train_on_prompt, config.overflow) \
        if held_chats else ([], None)
    echo(stats.summary())
    for warning in stats.warnings():
        echo(f"warning: {warning}")
    echo("one training example as the model sees it:\n" + render_example(tokenizer, train_set[0]))

    steps = config.steps or (BUILTIN.steps if builtin and not config.epochs else None)
    if steps is None:
        per_epoch = -(-len(train_set) // (config.batch_size * config.grad_accum))
        steps = max(1, round(per_epoch * (config.epochs or 1.0)))
    lr = config.lr or (BUILTIN.lr if builtin else 2e-4)
    warmup = config.warmup_steps if config.warmup_steps is not None else (
        BUILTIN.warmup_steps if builtin else round(0.05 * steps))
    # Only now, with the data and model loaded, is an old run replaced: a failed start loses nothing.
    if checkpoint is None and config.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**asdict(config), "steps": steps, "lr": lr, "warmup_steps": warmup, "output": str(run_dir)}
    echo("resolved config:\n" + _yaml(resolved))
    (run_dir / "config.yaml").write_text(_yaml(resolved), encoding="utf-8")

    eval_conversations = held_chats[: config.eval_examples]
    pad_id = tokenizer.pad_token_id

    def held_out_metrics(with_generation: bool) -> dict:
        metrics = evaluate_loss(model, held_set, pad_id) if held_set else {}
        if with_generation and eval_conversations:
            metrics.update(exact_match_accuracy(model, tokenizer, eval_conversations, config.max_new_tokens))
        return metrics

    before = held_out_metrics(with_generation=True) if checkpoint is None else None
    if before:
        echo("held-out before training: " + _format(before))

    torch.manual_seed(config.seed)  # adapter initialisation
    attach(model, adapter_config(config))
    echo(report(model))

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
                   resume=checkpoint, echo=echo)
    adapter_dir = save_adapter(model, run_dir / "adapter", base_model_name_or_path=str(model.name_or_path))
    plot_losses(run_dir / "log.jsonl", run_dir / "loss.png")
    if result.interrupted:
        return {"interrupted": True, "steps": result.steps_done, "adapter": str(adapter_dir)}

    after = held_out_metrics(with_generation=True)
    metrics = {"before": before, "after": after, "steps": result.steps_done, "train_seconds": result.seconds,
               "tokens_per_second": result.real_tokens / result.seconds if result.seconds else None,
               "adapter": str(adapter_dir)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    echo("held-out after training:  " + _format(after))
    if before:
        echo(_comparison(before, after))
    echo(f"trained {result.steps_done} steps in {result.seconds:.0f} s "
         f"({metrics['tokens_per_second']:.0f} tokens/s); adapter saved to {adapter_dir}")
    echo(f"loss curve: {run_dir / 'loss.png'}; step log: {run_dir / 'log.jsonl'}")
    return metrics


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
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def config_field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}
