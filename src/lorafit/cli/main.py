"""The `lorafit` command: `lorafit <train|eval|generate|merge|export|inspect|estimate|cache> [--config FILE] [flags]`.

Each command is a dataclass (its fields are both the flags and the YAML keys; field docstrings are
the --help text) and a `run(config)` function; tyro parses the command line into one of them, as a
subcommand. A YAML file given with --config sets the chosen command's defaults, which flags override
(read first, because tyro has no config files). Every mistake prints as one line: 1 for an error
lorafit found (bad data, model, settings, a value outside a flag's choices), 2 for a command line that
does not parse, 130 when interrupted; `--debug` shows the traceback too. The command modules import
torch and transformers inside `run`, so `--help` answers without loading them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import io
import re
import sys
import types
import typing
from pathlib import Path

from lorafit.errors import LorafitError

# command -> (module, config class, what it does)
COMMANDS = {
    "train": ("lorafit.cli.train", "TrainConfig",
              "fine-tune a model with LoRA (no arguments: the embedded model on the built-in task)"),
    "eval": ("lorafit.cli.evaluation", "EvalConfig",
             "loss, perplexity and exact match of a model (+ adapter) on held-out data"),
    "generate": ("lorafit.cli.generate", "GenerateConfig",
                 "answer a prompt with a model (+ adapter), streaming tokens"),
    "merge": ("lorafit.cli.merge", "MergeConfig",
              "fold an adapter into the base weights and save a plain transformers folder"),
    "export": ("lorafit.cli.export", "ExportConfig",
               "write an adapter or the merged model as GGUF, for llama.cpp, Ollama and LM Studio"),
    "inspect": ("lorafit.cli.inspect", "InspectConfig",
                "list a model's modules, which ones the targets select, and the parameter counts"),
    "estimate": ("lorafit.cli.estimate", "EstimateConfig",
                 "plan a training run's memory from the model's config: what it needs, what fits, which batch"),
    "cache": ("lorafit.cli.cache", "CacheConfig",
              "show lorafit's cache folders (converted models, prepared data) and clear the prepared data"),
}

ABOUT = ("Parameter-efficient fine-tuning (LoRA and family) in peft's file format. `lorafit <command> --help` lists a "
         "command's flags; `--config FILE.yaml` sets them from a file (keys = flag names). Global flags: --debug (show "
         "tracebacks), --version. Exit codes: 0 done, 1 error, 2 command line does not parse, 130 interrupted "
         "(resume with --resume RUN).")


# Said on every command's --help page: the two flags tyro does not list, since main takes them before tyro parses.
SUBCOMMAND_GLOBALS = ("--config FILE.yaml sets these flags from a file (keys = flag names, flags given win); --debug "
                      "shows the traceback of an error")


class UsageError(LorafitError):
    """The command line itself does not parse (exit code 2)."""


def _command(name: str):
    module_name, class_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, class_name), module.run


def _subcommands(chosen: str | None = None, default=None):
    """Every command as a tyro subcommand; `chosen` starts from `default` (its YAML settings)."""
    import tyro

    options = []
    for name, (_, _, about) in COMMANDS.items():
        config_class = _command(name)[0]
        start = {"default": default} if name == chosen and default is not None else {}
        description = f"{about}. {SUBCOMMAND_GLOBALS}" if name == chosen else about  # the command's own page
        options.append(typing.Annotated[config_class, tyro.conf.subcommand(name, description=description, **start)])
    return typing.Union[tuple(options)]


def print_help(file=None) -> None:
    """`lorafit --help`: the commands and what each does (tyro's rendering), plus global flags and exit codes."""
    import tyro

    with contextlib.redirect_stdout(file or sys.stdout):
        try:
            tyro.cli(_subcommands(), args=["--help"], prog="lorafit", description=ABOUT)
        except SystemExit:
            pass


def _type_ok(annotation, value) -> bool:
    """Does a YAML value fit a config field's annotation (int, float, str, bool, Optional, Literal)?"""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return any(_type_ok(arg, value) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin is typing.Annotated:
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


def _wants_float(annotation) -> bool:
    if annotation is float:
        return True
    return any(_wants_float(arg) for arg in typing.get_args(annotation))


def _looks_like_float(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def load_yaml_defaults(config_class, path: Path) -> dict:
    """The YAML file's settings, checked key by key against the command's fields."""
    import yaml

    if path.is_dir():
        raise LorafitError(f"--config {path} is a directory; give the YAML file of settings (e.g. {path}/run.yaml)")
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
    known = {f.name for f in dataclasses.fields(config_class)}
    if "model_type" in values and "model_type" not in known:  # a transformers config.json, not lorafit's settings
        where = f"--model-config {path}" if "model_config" in known else f"--model {path.parent} (its folder)"
        raise LorafitError(f"--config {path} is a model's config (it has model_type), not lorafit's settings; "
                           f"give it as {where}")
    hints = typing.get_type_hints(config_class, include_extras=True)
    settings = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LorafitError(f"{path}: unknown setting {key!r}{hint}")
        if name == "columns" and isinstance(value, dict):  # columns: {output: answer}, as the flags' KEY=COLUMN
            value = [f"{key}={column}" for key, column in value.items()]
        if not _type_ok(hints[name], value):
            hint = ""
            if _wants_float(hints[name]) and _looks_like_float(value):
                # YAML 1.1 (PyYAML) reads 2e-4 as a string: a float needs a dot, as in 2.0e-4.
                hint = f"; YAML reads {value} as text: write it with a dot, e.g. {key}: {float(value)!r}"
            raise LorafitError(f"{path}: {key} = {value!r} does not fit its type {hints[name]}{hint}")
        settings[name] = value
    return settings


def _pop_option(argv: list[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag:
            if index + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value")
            value = argv[index + 1]
            del argv[index : index + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[index]
            return arg.split("=", 1)[1]
    return None


def flags_given(argv: list[str], config_class) -> set[str]:
    """The config fields the command line names (tyro spells field x_y as --x-y, booleans also --no-x-y)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    given = set()
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name not in known and name.startswith("no_") and name[3:] in known:
            name = name[3:]
        if name in known:
            given.add(name)
    return given


# tyro draws its parse errors in boxes over a dozen lines (plain rules when not on a terminal); lorafit
# promises one line: the box's first paragraph, plus the flag tyro suggests.
_RULE_CHARACTERS = set("╭╮╰╯│─- ")


def _one_line_usage_error(rendered: str, command: str) -> str:
    lines = [line.strip().strip("╭╮╰╯│").strip() for line in rendered.splitlines()]
    paragraphs, current = [], []
    for line in lines[1:]:  # the first line is the box's title
        if not line or set(line) <= _RULE_CHARACTERS:
            if current:
                paragraphs.append(current)
            current = []
        else:
            current.append(line)
    if current:
        paragraphs.append(current)
    message = " ".join(paragraphs[0]) if paragraphs else "the command line does not parse"
    message = re.sub(r"\s+", " ", message).replace(", ", " ") if message.startswith("Unrecognized") else message
    for paragraph in paragraphs[1:]:
        if paragraph[0].startswith("Perhaps you meant") and len(paragraph) > 1:
            message = message.rstrip(".") + f" (did you mean {paragraph[1].split()[0].rstrip(',')}?)"
    return f"{re.sub(r'[ ]+', ' ', message)}; see lorafit {command} --help"


_INVALID_CHOICE = re.compile(r"invalid choice '(?P<value>[^']*)' for argument '(?P<flag>--[\w-]+)'\.\s*"
                             r"Expected one of \((?P<choices>[^)]*)\)")


def _refuse_unknown_choice(rendered: str) -> None:
    """A value outside a flag's choices (a Literal field: --method, --dtype, ...) is a setting lorafit refuses
    (exit 1, like any value out of range), said the way lorafit says it: the closest choice, then all of them."""
    match = _INVALID_CHOICE.search(re.sub(r"[\s│]+", " ", rendered))
    if match is None:
        return
    value, option = match["value"], match["flag"]
    choices = [c.strip().strip("'\"") for c in match["choices"].split(",")]
    choices = [c for c in choices if c and c != "None"]  # None: the flag left out (an Optional field)
    close = difflib.get_close_matches(value, choices, n=1)
    raise LorafitError(f"{option} {value!r} is unknown" + (f" (did you mean {close[0]}?)" if close else "")
                       + f"; use {', '.join(choices[:-1])} or {choices[-1]}")


def parse(argv: list[str]):
    """(command name, config instance, runner, fields the user set) from the command line."""
    import tyro

    name, rest = argv[0], list(argv[1:])
    if name not in COMMANDS:  # said before tyro, which would list the commands without the closest one
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        raise UsageError(f"unknown command {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                         + f"; commands: {', '.join(COMMANDS)}")
    config_class, runner = _command(name)
    config_file = _pop_option(rest, "--config")
    defaults = load_yaml_defaults(config_class, Path(config_file)) if config_file else {}
    # Fields without a default stay required unless the YAML file sets them.
    required = {f.name: tyro.MISSING for f in dataclasses.fields(config_class)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    commands = _subcommands(name, config_class(**{**required, **defaults}))
    if any(arg in ("-h", "--help") for arg in rest):
        tyro.cli(commands, args=[name, *rest], prog="lorafit", description=ABOUT)  # prints the help, exits 0
    rendered = io.StringIO()
    try:
        with contextlib.redirect_stderr(rendered), contextlib.redirect_stdout(rendered):
            config = tyro.cli(commands, args=[name, *rest], prog="lorafit", description=ABOUT)
    except SystemExit as stop:
        if stop.code in (0, None):
            raise
        _refuse_unknown_choice(rendered.getvalue())
        raise UsageError(_one_line_usage_error(rendered.getvalue(), name)) from None
    return name, config, runner, set(defaults) | flags_given(rest, config_class)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from lorafit import __version__

        print(f"lorafit {__version__}")
        return 0
    try:
        name, config, runner, given = parse(argv)
        _quiet_transformers()
        outcome = runner(config, given=given)
    except UsageError as err:
        if debug:
            raise
        print(f"lorafit {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except LorafitError as err:
        if debug:
            raise
        if not getattr(err, "printed_elsewhere", False):
            print(f"lorafit {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorafit {argv[0]}: interrupted", file=sys.stderr)
        return 130
    if isinstance(outcome, dict) and outcome.get("interrupted"):
        return 130  # stopped by SIGINT/SIGTERM after writing a checkpoint (the loop said how to resume)
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # lorafit prints its own progress

