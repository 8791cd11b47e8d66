"""The run folder `lorafit train` writes, and the rules that keep a user's other files safe.

A run folder holds only what lorafit wrote: `lorafit-run.json` (the marker: which model and data the
run was made from), `config.yaml`, `metrics.json`, `log.jsonl`, `loss.png`, `adapter/` and
`checkpoints/step-NNNNNN/`. `--overwrite` replaces such a folder and nothing else: a folder holding
anything lorafit did not write, or one of the run's own inputs, is refused with the names. Everything
is checked before the folder is touched, so a failed start leaves an earlier run exactly as it was.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from lorafit.errors import LorafitError, brief
from lorafit.files import check_writable, is_inside, write_json

MARKER = "lorafit-run.json"
CONFIG = "config.yaml"
METRICS = "metrics.json"
LOG = "log.jsonl"
PLOT = "loss.png"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"

_RUN_FILES = {MARKER, CONFIG, METRICS, LOG, PLOT}
_ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
_CHECKPOINT_FILES = _ADAPTER_FILES | {"trainer_state.json", "optimizer.safetensors", "rng.safetensors",
                                      "training_state.safetensors"}
# What an interrupted atomic write leaves: files.atomic_path's ".<name>.tmp-<pid>", checkpoint.py's
# ".step-NNNNNN.tmp-<pid>" and ".step-NNNNNN.tmp-deleting".
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(\d+|deleting)$")
_CHECKPOINT_NAME = re.compile(r"^step-\d{6,}$")


def _is_temporary_of(name: str, allowed) -> bool:
    match = _TEMPORARY.match(name)
    return bool(match) and (match["name"] in allowed if not callable(allowed) else allowed(match["name"]))


def foreign_entries(run: Path) -> list[str]:
    """Paths under `run` (relative) that lorafit did not write there; empty for a clean run folder."""
    foreign = []
    for entry in sorted(run.iterdir()):
        name = entry.name
        if name in _RUN_FILES and entry.is_file() and not entry.is_symlink():
            continue
        if _is_temporary_of(name, _RUN_FILES):
            continue
        if name == ADAPTER and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{ADAPTER}/{n}" for n in _unknown_files(entry, _ADAPTER_FILES)]
            continue
        if name == CHECKPOINTS and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{CHECKPOINTS}/{n}" for n in _foreign_checkpoint_entries(entry)]
            continue
        foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def _unknown_files(folder: Path, allowed: set[str]) -> list[str]:
    return [p.name + ("/" if p.is_dir() else "") for p in sorted(folder.iterdir())
            if not ((p.name in allowed or _is_temporary_of(p.name, allowed)) and p.is_file() and not p.is_symlink())]


def _foreign_checkpoint_entries(folder: Path) -> list[str]:
    foreign = []
    for entry in sorted(folder.iterdir()):
        is_checkpoint = _CHECKPOINT_NAME.match(entry.name) or _is_temporary_of(entry.name, _CHECKPOINT_NAME.match)
        if is_checkpoint and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{n}" for n in _unknown_files(entry, _CHECKPOINT_FILES)]
        else:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def read_marker(run: Path) -> dict | None:
    """The marker's record of the run (model, data), or None when there is none (a run by lorafit < 0.2)."""
    path = run / MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise LorafitError(f"{path} is damaged ({err}); the run's record of its model and data cannot be read") from None
    if not isinstance(record, dict) or record.get("lorafit_run") != 1:
        raise LorafitError(f"{path} is not a lorafit run marker")
    return record


def run_holding(path: Path) -> Path | None:
    """The run folder an adapter path belongs to: the run itself, its adapter/, or one of its checkpoints."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if candidate.is_dir() and (candidate / CONFIG).is_file() and is_run_folder(candidate):
            return candidate
    return None


def is_run_folder(run: Path) -> bool:
    """A folder lorafit made for a run: its marker, or (runs before the marker existed) config.yaml next
    to a checkpoints/ or adapter/ folder of lorafit's."""
    if (run / MARKER).is_file():
        return True
    if (run / CONFIG).is_file() and ((run / CHECKPOINTS).is_dir() or (run / ADAPTER / "adapter_config.json").is_file()):
        return True
    # a start killed while writing the marker leaves only its temporary file
    names = [p.name for p in run.iterdir()]
    return bool(names) and all(_is_temporary_of(name, _RUN_FILES) for name in names)


def check_output(run: Path, *, overwrite: bool, inputs: dict[str, Path]) -> None:
    """Refuse an output folder lorafit must not write into; never changes anything.

    `inputs` maps a flag (`--data`) to the path it named: an output folder that is or holds one of them
    is refused whatever --overwrite says, since replacing the folder would delete the input.
    """
    for flag, path in inputs.items():
        if path is not None and is_inside(path, run):
            raise LorafitError(f"--output {run} holds this run's input ({flag} {path}); replacing it would delete "
                               "that input: choose another --output")
    check_writable(run)
    if not run.exists() or not any(run.iterdir()):
        return
    if not overwrite:
        raise LorafitError(f"output folder {run} exists and is not empty; pass --overwrite to replace the run "
                           f"there, or --resume {run} to continue it")
    if not is_run_folder(run):
        names = sorted(p.name for p in run.iterdir())
        raise LorafitError(f"--overwrite: {run} is not a lorafit run folder (it holds {brief(names)}); lorafit only "
                           "replaces folders it made: choose another --output")
    foreign = foreign_entries(run)
    if foreign:
        raise LorafitError(f"--overwrite: {run} holds files lorafit did not write ({brief(foreign)}); move them "
                           "out or choose another --output")


def clear_run(run: Path) -> None:
    """Delete what an earlier run wrote in `run` (after check_output allowed --overwrite)."""
    foreign = foreign_entries(run)
    if foreign:  # checked before; checked again since files may have appeared while the model loaded
        raise LorafitError(f"--overwrite: {run} holds files lorafit did not write ({brief(foreign)})")
    # The marker goes last: a kill midway leaves a folder still recognised as a run, which --overwrite
    # can clear again, rather than one lorafit would refuse to touch.
    for entry in sorted(run.iterdir(), key=lambda p: p.name == MARKER):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_marker(run: Path, record: dict) -> None:
    write_json(run / MARKER, {"lorafit_run": 1, **record})
