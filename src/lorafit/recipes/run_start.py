"""Where a `lorafit train` run starts: a new, checked run folder, or the run `--resume` continues.

A resumed run takes its settings from its own config.yaml; flags that would change them are refused,
naming each, and so are changed data (SHA-256 in the run's marker) and another base model. Nothing
here writes a file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import yaml

from lorafit.core.selection import parse_targets
from lorafit.errors import LorafitError, first_line
from lorafit.files import check_writable
from lorafit.recipes.train_settings import (
    PATH_SETTINGS,
    PERMISSIONS,
    RESUME_MAY_CHANGE,
    TrainConfig,
    check_settings,
    flag,
)
from lorafit.train import run_folder
from lorafit.train.run_folder import CONFIG


def absolute(value: Optional[str]) -> Optional[str]:
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


# config.yaml's one key that is not a setting: what --quantize did (layers, what stayed float, sizes).
REPORT_KEY = "quantized"


def read_run_settings(run: Path, keep_report: bool = False) -> dict:
    path = run / CONFIG
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise LorafitError(f"{path} is damaged ({first_line(err)}); the run's settings cannot be read") from None
    if isinstance(saved, dict) and not keep_report:
        saved.pop(REPORT_KEY, None)
    known = {f.name for f in fields(TrainConfig)} | ({REPORT_KEY} if keep_report else set())
    if not isinstance(saved, dict) or not set(saved) <= known:
        odd = sorted(set(saved) - known) if isinstance(saved, dict) else [type(saved).__name__]
        raise LorafitError(f"{path} is not a lorafit run's settings (unexpected: {', '.join(map(str, odd))})")
    return saved


def restore_run_settings(config: TrainConfig, given: set[str]) -> tuple[TrainConfig, Path, Optional[Path]]:
    """The settings the resumed run continues with: its config.yaml, plus only what may change.

    Returns (settings, run folder, the checkpoint named or None for the run's newest).
    """
    run, checkpoint = _locate_resume(config.resume)
    saved = read_run_settings(run)
    conflicts = []
    for name in sorted(given - set(RESUME_MAY_CHANGE) - set(PERMISSIONS) - {"resume", "output", "overwrite"}):
        now, then = getattr(config, name), saved.get(name)
        if name in PATH_SETTINGS:
            now, then = absolute(now), absolute(then)
        elif name in ("targets", "feedforward_targets"):  # q_proj,v_proj and [q_proj, v_proj] are the same
            now, then = parse_targets(now), parse_targets(then)
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


def check_same_inputs(record: Optional[dict], fingerprints: dict[str, str], run: Path) -> None:
    """On resume, the data must be what the run started from: every file of it (fingerprints: setting name ->
    DataSource.fingerprint(), for a single file its SHA-256, as the run's marker recorded them)."""
    if record is None:
        return
    for name in ("data", "eval_data"):
        entry = record.get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue
        if name not in fingerprints:
            raise LorafitError(f"{flag(name)}: the run was trained with {entry.get('path')}; resume needs it")
        if fingerprints[name] != entry["sha256"]:
            raise LorafitError(f"{flag(name)} {entry.get('path')} has changed since the run started (its SHA-256 over "
                               f"every file differs from the one in {run / 'lorafit-run.json'}); resume needs the same "
                               "data, or start a new run")


@dataclass
class RunStart:
    """Where a run starts: its settings, folder and, when resumed, the checkpoint and what the run recorded."""

    config: TrainConfig
    run_dir: Path
    checkpoint: object = None  # train.checkpoint.CheckpointState when resuming
    record: Optional[dict] = None  # the run's lorafit-run.json
    saved_before: Optional[dict] = None  # its held-out metrics before training
    finished: bool = False  # its metrics.json has the after-training metrics


def start_or_resume(config: TrainConfig, given: set[str], echo) -> RunStart:
    """A new run's checked output folder, or the resumed run's settings and checkpoint; writes nothing."""
    from lorafit.train.checkpoint import newest_readable, read_checkpoint

    if not config.resume:
        run_dir = Path(config.output) if config.output else Path("runs") / time.strftime("lorafit-%Y%m%d-%H%M%S")
        inputs = {"--data": config.data, "--eval-data": config.eval_data, "--model": absolute(config.model)}
        run_folder.check_output(run_dir, overwrite=config.overwrite, inputs=inputs)
        return RunStart(config, run_dir)
    config, run_dir, named_checkpoint = restore_run_settings(config, given)
    check_settings(config, set())
    checkpoint = read_checkpoint(named_checkpoint) if named_checkpoint else newest_readable(
        run_dir / run_folder.CHECKPOINTS, echo)
    if checkpoint is None:
        raise LorafitError(f"--resume {run_dir}: no readable checkpoint in {run_dir / run_folder.CHECKPOINTS}")
    check_writable(run_dir)
    saved_before, finished = read_run_metrics(run_dir / run_folder.METRICS)
    if config.steps is not None:
        check_resume_length(run_dir, config.steps, checkpoint.position.step, finished)
    return RunStart(config, run_dir, checkpoint, run_folder.read_marker(run_dir), saved_before, finished)


def check_same_base(record: Optional[dict], model, run_dir: Path) -> None:
    """On resume, the model loaded must be the base the run was trained on (lorafit.models.identity)."""
    from lorafit.models.identity import mismatch

    recorded = (record or {}).get("base_model")
    if not isinstance(recorded, dict):
        return  # a run folder without a marker (recognised by run_folder.is_run_folder) records none
    differs = mismatch(recorded.get("fingerprint") or {}, model)
    if differs:
        raise LorafitError(f"--resume {run_dir}: the run was trained on {recorded.get('model')}, and the model "
                           f"loaded now is not that one ({differs})")


def read_run_metrics(path: Path) -> tuple[Optional[dict], bool]:
    """(the held-out metrics measured when the run started, whether it finished: its "after" is written)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None, False
    if not isinstance(metrics, dict):
        return None, False
    before = metrics.get("before")
    return (before if isinstance(before, dict) else None), isinstance(metrics.get("after"), dict)


def check_resume_length(run_dir: Path, steps: int, at: int, finished: bool) -> None:
    """A resumed run must have steps left, or be one that stopped between its last checkpoint and its end."""
    if steps > at or (steps == at and not finished):
        return
    if steps == at:
        raise LorafitError(f"--resume {run_dir}: the run is finished (step {at} of {steps}); pass --steps N with "
                           f"N > {at} to train further")
    raise LorafitError(f"--resume {run_dir}: the checkpoint is at step {at}, beyond {steps} steps; pass --steps N "
                       f"with N > {at}")
