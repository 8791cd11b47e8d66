"""`lorafit train`'s settings: the shared ones, each registered method's options, and their checks.

`TrainConfig` is one flat dataclass (flags = YAML keys = fields; field docstrings are the --help):
`TrainSettings` plus the options every registered method declares (methods/options.py for the built-in
ones). `check_settings` refuses, before anything is loaded, every value out of range and every flag of
a method other than the one chosen.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from typing import Literal, Optional, Union

from lorafit.core.registry import (
    check_ranges,
    config_from_options,
    entries,
    entry_for,
    option_owners,
    spellings,
)
from lorafit.core.registry import learning_rate_ratios as method_learning_rate_ratios
from lorafit.core.selection import finite_in_float32, parse_targets
from lorafit.data.tasks import BUILTIN
from lorafit.errors import LorafitError
from lorafit.methods import DEFAULT_METHOD
from lorafit.models.options import ModelDtype, ModelLoadOptions, quantize_settings

# --method's choices: every registered method's spellings (lora, dora, ia3, bitfit, ...)
MethodName = Literal[spellings()]


@dataclass(kw_only=True)
class TrainSettings(ModelLoadOptions):
    """The settings of `lorafit train` every method shares; TrainConfig adds each method's own options."""

    data: Optional[str] = None
    """Instruction data: a .jsonl/.json (also .gz), .parquet, .csv/.tsv or .arrow file, a folder of such files, a glob
    ('shards/*.parquet') or a datasets save_to_disk folder; records in alpaca, chat messages, ShareGPT,
    prompt/completion or text form (default: the built-in date-rewriting task). Tokenised once and cached."""
    eval_data: Optional[str] = None
    """Held-out data, in any form --data takes (default: a datasets folder's validation or test split, else a split
    of --data)."""
    columns: Optional[list[str]] = None
    """The data's own names for lorafit's record fields, as KEY=COLUMN items: instruction=question output=answer;
    for chat columns also role_tag=from content_tag=value user_tag=human assistant_tag=gpt system_tag=system."""
    held_out: float = 0.05
    """Part of --data held out for evaluation when --eval-data is not given: a fraction in [0, 1), which holds out
    at most 1000 examples, or a count (the built-in task holds out its own 100)."""
    method: MethodName = DEFAULT_METHOD
    """Adapter method (its own flags are refused with another method)."""
    targets: Optional[list[str]] = None
    """Module names (exact or dotted suffix; space- or comma-separated), 'all-linear', or one regex over full module
    paths (default: the architecture's usual choice, q_proj v_proj for Llama)."""
    steps: Optional[int] = None
    """Optimizer steps (default: one epoch; the built-in task uses its preset). With --resume: more steps than the
    run had continues it further (the cosine schedule then spans the new total)."""
    epochs: Optional[float] = None
    """Epochs over the training data (instead of --steps)."""
    batch_size: Union[int, Literal["auto"]] = 8
    """Examples per micro-batch, or 'auto': the largest whose step the memory planner fits in the memory free
    after loading (less a 10% margin; on CUDA confirmed by one real step). The number chosen is recorded."""
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
    """Held-out examples scored, by the loss and exact match alike: the first N that fit --max-length whole
    (0: no held-out scoring)."""
    max_new_tokens: int = 32
    """Generation length for exact match (0: no exact match, the held-out loss only)."""
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
    nproc: Optional[int] = None
    """Train in N processes on this machine (torchrun --standalone --nproc-per-node N): data parallel, each
    process runs its share of every --batch-size micro-batch; the result is the one-process result. Under
    your own torchrun (several machines, SLURM) leave it out."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun / --nproc: ddp (every process holds the whole model) or fsdp (FSDP2: each holds 1/N of
    the frozen base, all-gathered layer by layer; for a base that does not fit one device). The adapter is
    whole on every process either way, and the result is the same."""
    collective_timeout: int = 300
    """Under torchrun: seconds a process waits for the others at a step before failing (a rank lost or hung).
    Under ddp rank 0 evaluates the held-out set alone while the others wait, so keep it above that evaluation's
    time."""


def _with_method_options(settings: type) -> type:
    """TrainConfig: the shared settings plus every registered method's options, as one flat dataclass.

    Flat, so that flags and YAML keys stay `--r` / `r:`; two methods may share an option only if they
    declare it identically (LoRA and DoRA share one options class).
    """
    option_classes = list(dict.fromkeys(e.options for e in entries() if e.options is not None))
    seen: dict[str, dataclasses.Field] = {f.name: f for f in fields(settings)}
    for options in option_classes:
        for option in fields(options):
            if option.name in seen and (seen[option.name].type, seen[option.name].default) != (option.type, option.default):
                raise LorafitError(f"{options.__name__}.{option.name} clashes with another setting of that name")
            seen[option.name] = option
    config = dataclasses.make_dataclass("TrainConfig", [], bases=(*reversed(option_classes), settings))
    config.__doc__ = "Fine-tune a causal language model with an adapter (LoRA by default) on instruction data."
    config.__module__ = __name__
    return config


TrainConfig = _with_method_options(TrainSettings)

DEFAULT_LR = 2e-4
DEFAULT_HELD_OUT_CAP = 1000  # a --held-out fraction holds out at most this many examples (a count: as many as it says)


# What --resume takes from the command line; every other setting comes from the run's config.yaml.
RESUME_MAY_CHANGE = ("steps", "epochs", "eval_every", "eval_examples", "max_new_tokens", "save_every",
                     "keep_checkpoints", "on_nonfinite", "gradient_checkpointing", "compile", "row_tokens",
                     "nproc", "collective_timeout", "strategy")
# Permissions are never taken from a file: a resumed run that needed them must be given them again.
PERMISSIONS = ("allow_pickle", "trust_remote_code")
PATH_SETTINGS = ("model", "data", "eval_data")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_settings(config: TrainConfig) -> set[str]:
    """For library callers: the settings that differ from their defaults (the CLI passes what was typed)."""
    default = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) != getattr(default, f.name)}


def check_settings(config: TrainConfig, given: set[str]) -> None:
    """Refuse every setting that is out of range or does not apply, before anything is loaded."""
    try:
        entry_for(config.method)
    except LorafitError as err:
        raise LorafitError(f"--{err}") from None
    for name, methods in option_owners().items():
        if name in given and config.method not in methods:
            raise LorafitError(f"{flag(name)} is a {'/'.join(m.upper() for m in methods)} setting; --method "
                               f"{config.method} does not use it")
    if config.batch_size != "auto" and not isinstance(config.batch_size, int):
        raise LorafitError(f"--batch-size must be a number >= 1 or 'auto', got {config.batch_size!r}")
    check_ranges(config)  # the methods' own options (--r, --alpha, --dropout, ...)
    for name in ("batch_size", "grad_accum", "row_tokens", "keep_checkpoints"):
        if name == "batch_size" and config.batch_size == "auto":
            continue
        if getattr(config, name) < 1:
            raise LorafitError(f"{flag(name)} must be >= 1, got {getattr(config, name)}")
    if config.max_length < 2:
        raise LorafitError(f"--max-length must be >= 2, got {config.max_length}")
    for name in ("eval_examples", "max_new_tokens", "warmup_steps", "eval_every", "save_every"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise LorafitError(f"{flag(name)} must be >= 0, got {value}")
    for name in ("lr", "epochs", "max_grad_norm"):
        value = getattr(config, name)
        if value is not None and not (finite_in_float32(value) and value > 0):
            raise LorafitError(f"{flag(name)} must be a finite number > 0, got {value}")
    if not (finite_in_float32(config.weight_decay) and config.weight_decay >= 0):
        raise LorafitError(f"--weight-decay must be a finite number >= 0, got {config.weight_decay}")
    if not (math.isfinite(config.held_out) and config.held_out >= 0
            and (config.held_out < 1 or float(config.held_out).is_integer())):
        raise LorafitError(f"--held-out must be a fraction in [0, 1) or a whole count, got {config.held_out}")
    if config.steps is not None and config.steps < 1:
        raise LorafitError(f"--steps must be > 0, got {config.steps}")
    if config.steps is not None and config.epochs is not None:
        raise LorafitError("give --steps or --epochs, not both")
    if config.dtype is not None and config.dtype not in typing.get_args(ModelDtype):  # a library caller's value
        raise LorafitError(f"--dtype {config.dtype!r} is unknown; use float32, bfloat16 or float16")
    quantize_settings(config.quantize, config.double_quant)
    if config.columns is not None:
        from lorafit.data.columns import ColumnMap

        ColumnMap.parse(config.columns)
    if config.data is None:
        if config.columns:
            raise LorafitError("--columns names the columns of --data; the built-in task has its own")
        if config.eval_data:
            raise LorafitError("--eval-data needs --data (the built-in task makes its own held-out split)")
        if "held_out" in given:
            raise LorafitError(f"--held-out applies to --data; the built-in task holds out its own "
                               f"{BUILTIN.held_out_examples} examples")
    if config.resume and config.overwrite:
        raise LorafitError("--overwrite replaces a run and --resume continues one: give one of them")
    if config.nproc is not None and config.nproc < 1:
        raise LorafitError(f"--nproc must be >= 1, got {config.nproc}")
    if config.nproc is not None and config.nproc > 1 and config.batch_size == "auto":
        raise LorafitError("--batch-size auto plans one process's memory; with --nproc give the global --batch-size "
                           "(each process runs its share of it)")
    if config.strategy not in ("ddp", "fsdp"):  # a library caller's value
        raise LorafitError(f"--strategy {config.strategy!r} is unknown; use ddp or fsdp")
    if config.strategy == "fsdp" and config.nproc is not None and config.nproc < 2:
        raise LorafitError("--strategy fsdp shards the frozen base over several processes; --nproc must be >= 2")
    if config.strategy == "fsdp":
        from lorafit.train.fsdp import check_fsdp_settings

        check_fsdp_settings(quantized=config.quantize not in (None, "none"), compile=config.compile,
                            method=entry_for(config.method))
    if config.collective_timeout < 1:
        raise LorafitError(f"--collective-timeout must be >= 1 second, got {config.collective_timeout}")


def _option_values(config: TrainConfig) -> dict:
    """The settings that are some method's options, with their values (the registry picks the chosen one's)."""
    return {name: getattr(config, name) for name in option_owners()}


def adapter_config(config: TrainConfig):
    """The library config that --method and its flags describe."""
    return config_from_options(config.method, parse_targets(config.targets), _option_values(config))


def learning_rate_ratios(config: TrainConfig) -> dict[str, float]:
    """{parameter-dict name: lr multiplier} the chosen method asks for (LoRA+), else {}."""
    return method_learning_rate_ratios(config.method, _option_values(config))
