"""`lorafit train` under torchrun on this CPU (gloo): --nproc, two nodes on loopback, a lost rank.

Each run here starts real processes through torchrun, as a user's command line would.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli.main import main
from tests.cli.test_train_trust import write_dates

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dates(tmp_path_factory.mktemp("dist-data") / "dates.jsonl", 40)


def train_args(model: Path, data: Path, output: Path, **extra) -> list[str]:
    settings = {"model": model, "data": data, "output": output, "steps": 4, "batch-size": 5, "grad-accum": 2,
                "dropout": 0.0, "dtype": "float32", "lr": 5e-3, "eval-examples": 0, "save-every": 2,
                "held-out": 4, **extra}
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process_run(tiny_chat_model, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *train_args(tiny_chat_model, data, run, **{"eval-examples": 3})]) == 0
    return run


def assert_same_training(run: Path, reference: Path) -> None:
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)
    for name, tensor in adapter(reference).items():
        torch.testing.assert_close(adapter(run)[name], tensor, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_nproc_2_trains_as_one_process_and_only_rank_0_writes(tiny_chat_model, data, one_process_run, tmp_path,
                                                              capsys):
    run = tmp_path / "run"
    # the held-out loss on the one-process run's 3 examples; no exact match (--max-new-tokens 0)
    assert main(["train", *train_args(tiny_chat_model, data, run, **{"eval-examples": 3, "max-new-tokens": 0}),
                 "--nproc", "2"]) == 0
    assert_same_training(run, one_process_run)
    assert json.loads((run / "metrics.json").read_text())["after"]["loss"] == pytest.approx(
        json.loads((one_process_run / "metrics.json").read_text())["after"]["loss"], abs=1e-5)


def test_fsdp_over_2_processes_trains_as_one_process(tiny_chat_model, data, one_process_run, tmp_path, capfd):
    """--strategy fsdp: the frozen base sharded over 2 processes gives the one-process run (losses, adapter, files);
    the held-out evaluation, greedy generation included, runs on both in step and scores as one process."""
    run = tmp_path / "run"
    assert main(["train", *train_args(tiny_chat_model, data, run, **{"eval-examples": 3}),
                 "--nproc", "2", "--strategy", "fsdp"]) == 0
    assert_same_training(run, one_process_run)
    assert "FSDP2: the frozen base sharded over 2 processes" in capfd.readouterr().out
    after, expected = (json.loads((r / "metrics.json").read_text())["after"] for r in (run, one_process_run))
    assert set(after) == set(expected) and after["exact_match"] == expected["exact_match"]
    assert after["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    # perplexity is exp(loss), ~260 here: the loss's 1e-5 bound becomes a relative one
    assert after["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_on_loopback_train_as_one_process(tiny_chat_model, data, one_process_run, tmp_path, strategy):
    """Two torchrun launches, one process each, joined at a rendezvous on 127.0.0.1 (as two machines would);
    under fsdp the frozen base is sharded across the two "machines"."""
    run, port = tmp_path / "run", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                                  "--master-addr", "127.0.0.1", "--master-port", str(port),
                                  "-m", "lorafit", "train", *train_args(tiny_chat_model, data, run,
                                                                            strategy=strategy)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for node in (0, 1)]
    outputs = [launch.communicate(timeout=600)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    assert_same_training(run, one_process_run)


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes torchrun started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().split(")")[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if parent == launcher_pid and b"RANK" in variables:
            found[int(variables[b"RANK"])] = int(entry.name)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("how", "strategy"), [("killed", "ddp"), ("hung", "ddp"), ("killed", "fsdp"), ("hung", "fsdp")])
def test_a_lost_rank_stops_the_others_in_bounded_time_with_a_message(tiny_chat_model, data, tmp_path, how, strategy):
    """Rank 1 SIGKILLed: rank 0's next collective fails at once (gloo sees the connection reset) and torchrun's
    summary names rank 1. Rank 1 stopped (SIGSTOP, a hung process): rank 0 gives up after --collective-timeout."""
    run = tmp_path / "run"
    args = train_args(tiny_chat_model, data, run, steps=100000, strategy=strategy,
                      **{"save-every": 0, "collective-timeout": 10})
    launcher = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "lorafit", "train",
                                 *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    workers = {}
    try:
        deadline = time.monotonic() + 300
        while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count("\n") >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
            time.sleep(0.5)
        workers = _worker_pids(launcher.pid)
        assert sorted(workers) == [0, 1]
        lost = time.monotonic()
        os.kill(workers[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        output = launcher.communicate(timeout=180)[0]
        took = time.monotonic() - lost
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if how == "hung" and workers:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(workers[1], signal.SIGKILL)
    assert launcher.returncode != 0
    assert "lorafit train: error: rank 0: the other training processes stopped answering during a step" in output, output[-6000:]
    if how == "killed":
        assert took < 30, took
        assert "rank      : 1 (local_rank: 1)" in output and "SIGKILL" in output, output[-3000:]
    else:
        assert 10 <= took < 120, took  # the timeout, then torchrun's own shutdown of the stopped process
    assert not (run / "adapter").exists()  # no adapter saved from a run that did not finish


def test_settings_that_do_not_apply_across_processes_are_refused_in_one_line(tiny_chat_model, data, tmp_path,
                                                                              capsys):
    from tests.cli.test_train_trust import error_line

    base = train_args(tiny_chat_model, data, tmp_path / "run")
    assert main(["train", *base, "--nproc", "0"]) == 1
    assert "--nproc must be >= 1, got 0" in error_line(capsys)
    assert main(["train", *base, "--nproc", "2", "--batch-size", "auto"]) == 1
    assert "--batch-size auto plans one process's memory" in error_line(capsys)
    assert main(["train", *base, "--strategy", "fsdp"]) == 1
    assert "--strategy fsdp shards the frozen base over several processes" in error_line(capsys)
    assert main(["train", *base, "--strategy", "fsdp", "--nproc", "2", "--quantize", "nf4"]) == 1
    assert "--strategy fsdp with --quantize" in error_line(capsys)
    without_dropout = [item for i, item in enumerate(base) if "--dropout" not in base[max(i - 1, 0): i + 1]]
    assert main(["train", *without_dropout, "--strategy", "fsdp", "--nproc", "2", "--method", "bitfit"]) == 1
    assert "--strategy fsdp with BitFit" in error_line(capsys)
    assert main(["train", *base, "--collective-timeout", "0"]) == 1
    assert "--collective-timeout must be >= 1 second" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_start_rank_0_refuses_stops_every_rank_with_its_line_said_once(tiny_chat_model, data, tmp_path, capfd):
    """--output naming a folder of the user's: rank 0 refuses it, the other rank stops with it, nothing is written,
    and the refusal is printed once (then the launcher's own line)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["train", *train_args(tiny_chat_model, data, mine), "--nproc", "2"]) == 1
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 2, err[-3000:]
    assert str(mine) in errors[0] and "torchrun exited with code 1" in errors[1]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_the_embedded_default_converts_into_an_empty_cache_under_nproc_2(tmp_path, monkeypatch):
    """The default model's first use under torchrun: every process converts its GGUF before joining the others
    (after, transformers' save_pretrained writes on rank 0 only and the other processes found an empty folder)."""
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--nproc", "2", "--steps", "1", "--batch-size", "2", "--eval-examples", "0",
                 "--output", str(run)]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    converted = [p for p in (tmp_path / "cache" / "models").iterdir()]
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()  # no partial folder left
