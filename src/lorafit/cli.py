"""The `lorafit` command: `lorafit <train|eval|generate|merge|inspect> [--config FILE] [flags]`.

Each command is a dataclass (its fields are both the flags and the YAML keys; field docstrings are
the --help text, via tyro) and a `run(config)` function. A YAML file given with --config sets
defaults that flags override. Errors the user can fix print as one line and exit 1; `--debug` shows
the traceback too.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path

from lorafit.errors import LorafitError


def _commands() -> dict:
    from lorafit.commands import evaluation, generate, inspect, merge, train

    return {
        "train": (train.TrainConfig, train.run),
        "eval": (evaluation.EvalConfig, evaluation.run),
        "generate": (generate.GenerateConfig, generate.run),
        "merge": (merge.MergeConfig, merge.run),
        "inspect": (inspect.InspectConfig, inspect.run),
    }


USAGE = """usage: lorafit <command> [--config FILE] [flags]   (lorafit <command> --help for its flags)

commands:
  train      fine-tune a model with LoRA (no arguments: the embedded model on the built-in task)
  eval       loss, perplexity and exact match of a model (+ adapter) on held-out data
  generate   answer a prompt with a model (+ adapter), streaming tokens
  merge      fold an adapter into the base weights and save a plain transformers folder
  inspect    list a model's modules, which ones the targets select, and the parameter counts

global flags: --debug (show tracebacks)"""


def _type_ok(annotation, value) -> bool:
    """Does a YAML value fit a config field's annotation (int, float, str, bool, Optional, Literal)?"""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return any(_type_ok(arg, value) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_ok(typing.get_args(annotation)[0], value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    return True


def load_yaml_defaults(config_class, path: Path) -> dict:
    """The YAML file's settings, checked key by key against the command's fields."""
    import yaml

    if not path.is_file():
        raise LorafitError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LorafitError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise LorafitError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise LorafitError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(config_class, include_extras=True)
    known = {f.name for f in dataclasses.fields(config_class)}
    settings = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LorafitError(f"{path}: unknown setting {key!r}{hint}")
        if not _type_ok(hints[name], value):
            raise LorafitError(f"{path}: {key} = {value!r} does not fit its type {hints[name]}")
        settings[name] = value
    return settings


def _pop_option(argv: list[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag:
            if index + 1 >= len(argv):
                raise LorafitError(f"{flag} needs a value")
            value = argv[index + 1]
            del argv[index : index + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[index]
            return arg.split("=", 1)[1]
    return None


def parse(argv: list[str]):
    """(command name, config instance, runner) from the command line."""
    import tyro

    commands = _commands()
    name, rest = argv[0], list(argv[1:])
    if name not in commands:
        close = difflib.get_close_matches(name, list(commands), n=1)
        raise LorafitError(f"unknown command {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                           + f"; commands: {', '.join(commands)}")
    config_class, runner = commands[name]
    # `inspect --config` names a model's config.json (as in the issue); every other command reads YAML.
    config_file = None if name == "inspect" else _pop_option(rest, "--config")
    defaults = load_yaml_defaults(config_class, Path(config_file)) if config_file else {}
    # Fields without a default stay required unless the YAML file sets them.
    required = {f.name: tyro.MISSING for f in dataclasses.fields(config_class)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    default = config_class(**{**required, **defaults})
    config = tyro.cli(config_class, args=rest, default=default, prog=f"lorafit {name}")
    return name, config, runner


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from lorafit import __version__

        print(f"lorafit {__version__}")
        return 0
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # lorafit prints its own progress
    try:
        name, config, runner = parse(argv)
        outcome = runner(config)
    except LorafitError as err:
        if debug:
            raise
        print(f"lorafit {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorafit {argv[0]}: interrupted", file=sys.stderr)
        return 130
    if isinstance(outcome, dict) and outcome.get("interrupted"):
        return 130  # stopped by SIGINT/SIGTERM after writing a checkpoint (the loop said how to resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
