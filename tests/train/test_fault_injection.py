"""Kill `lorafit train` (SIGKILL) at chosen and at random points, resume, and get the same adapter.

The child process is the real command line with one of lorafit's own functions wrapped so that the
process kills itself on its k-th call: inside a training step (the loss), between the files of a
checkpoint, or while the final adapter is written. One more run is killed from outside after a
random delay. Each run is then completed the way a user would: `--resume RUN` when a checkpoint is
there, else the same command with `--overwrite`; the final adapter must equal, tensor for tensor, the
one an uninterrupted run writes, and the step log must hold every step once.
"""

import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from lorafit.train.checkpoint import list_checkpoints

CHILD = textwrap.dedent("""
    import os, signal, sys
    mode, k = sys.argv[1].split(":")
    k, calls = int(k), [0]

    def kill_on_call(original, after):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if calls[0] == k and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped

    if mode == "step":  # in the middle of a training step, before its loss is known
        import lorafit.train.step as target
        target.summed_token_loss = kill_on_call(target.summed_token_loss, after=False)
    elif mode == "checkpoint":  # a checkpoint half written: after one of its safetensors files
        import lorafit.train.checkpoint as target
        target.save_file = kill_on_call(target.save_file, after=True)
    elif mode == "adapter":  # while an adapter (a checkpoint's or the final one) is written
        import lorafit.formats.peft as target
        target.save_file = kill_on_call(target.save_file, after=True)
    from lorafit.cli.main import main
    sys.exit(main(sys.argv[2:]))
""")

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_chat_model):
    root = tmp_path_factory.mktemp("faults")
    data = root / "dates.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(20, seed=2)))
    reference = root / "reference"
    assert main(_args(tiny_chat_model, data, reference)) == 0
    return {"root": root, "data": data, "model": tiny_chat_model,
            "adapter": load_file(reference / "adapter" / "adapter_model.safetensors")}


def _args(model, data, output):
    return ["train", "--model", str(model), "--data", str(data), "--steps", str(STEPS), "--batch-size", "4",
            "--lr", "1e-2", "--save-every", "2", "--eval-examples", "0", "--held-out", "2", "--output", str(output)]


def _complete(setup, run) -> int:
    """Finish an interrupted run as a user would; returns how many commands it took (0: the kill came after the
    run's last write, while the process was exiting, and the run is complete as it stands)."""
    metrics = run / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("after") is not None:
        return 0
    for attempt in range(1, 6):
        if list_checkpoints(run / "checkpoints"):
            code = main(["train", "--resume", str(run)])
        else:
            code = main(_args(setup["model"], setup["data"], run) + ["--overwrite"])
        if code == 0:
            return attempt
    pytest.fail(f"{run} did not complete in 5 commands")


def _check_same_as_uninterrupted(setup, run):
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == setup["adapter"].keys()
    for key, value in setup["adapter"].items():
        assert torch.equal(adapter[key], value), key
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert json.loads((run / "metrics.json").read_text())["after"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["step:3", "step:6", "checkpoint:2", "checkpoint:7", "adapter:3", "adapter:4"])
def test_killed_at_a_chosen_point_then_resumed_gives_the_uninterrupted_adapter(setup, plan):
    run = setup["root"] / plan.replace(":", "-")
    child = subprocess.run([sys.executable, "-c", CHILD, plan, *_args(setup["model"], setup["data"], run)],
                           capture_output=True, cwd=".")
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    _complete(setup, run)
    _check_same_as_uninterrupted(setup, run)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_killed_at_a_random_moment_then_resumed_gives_the_uninterrupted_adapter(setup, seed):
    run = setup["root"] / f"random-{seed}"
    child = subprocess.Popen([sys.executable, "-c", CHILD, "none:0", *_args(setup["model"], setup["data"], run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=".")
    deadline = time.monotonic() + 120
    while not (run / "log.jsonl").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.6))  # somewhere in the steps and saves (~2 s from here to the end)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run ended before the kill: shorten the delay"
    _complete(setup, run)
    _check_same_as_uninterrupted(setup, run)
