"""How `lorafit train` runs in several processes: `--nproc N` starts torchrun on this machine, and under any
torchrun each process joins the process group (lorafit.train.distributed) for the length of the job."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from lorafit.errors import LorafitError
from lorafit.recipes.run_start import absolute, read_run_settings
from lorafit.recipes.train_settings import TrainConfig


def launch_torchrun(config: TrainConfig, given: set[str], echo) -> dict:
    """--nproc N: the same command in N processes on this machine, started by torchrun (--standalone).

    The settings given travel as a YAML file (keys = flags), so the processes run exactly what was asked.
    """
    import subprocess
    import sys
    import tempfile

    settings = {name: getattr(config, name) for name in sorted(given)}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lorafit-nproc-", delete=False) as handle:
        handle.write(yaml.safe_dump(settings, sort_keys=False))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.nproc}",
               "-m", "lorafit", "train", "--config", handle.name]
    echo(f"--nproc {config.nproc}: {' '.join(command)}")
    try:
        done = subprocess.run(command, check=False)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise LorafitError(f"torchrun exited with code {done.returncode}; the failing rank's error is above")
    return {"nproc": config.nproc}


@contextmanager
def joined_process_group(config: TrainConfig) -> Iterator:
    """This process's place among torchrun's (None when it runs alone), for the length of the block."""
    import torch

    from lorafit.train import distributed

    if distributed.launched_by_torchrun():
        _convert_before_joining(config)
    ranks = distributed.start("cuda" if torch.cuda.is_available() else "cpu", config.collective_timeout)
    try:
        yield ranks
    finally:
        distributed.stop()


def _convert_before_joining(config: TrainConfig) -> None:
    """Under torchrun, convert a .gguf base (the embedded default) into the cache before joining the others.

    Once the process group exists, transformers' save_pretrained writes on global rank 0 only, so a conversion
    made then leaves an empty folder on every other process (and on every other machine). Each process
    converts on its own instead (the first one to finish puts its folder in place; the cache is shared safely).
    The errors are left to the start proper, which reports them in one line on rank 0.
    """
    from lorafit.models.loading import resolve_model_folder

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
