"""A process killed (SIGKILL) at any moment while saving leaves every visible checkpoint loadable."""

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

import lorafit
from lorafit import LoraConfig
from lorafit.train.checkpoint import list_checkpoints, read_checkpoint, restore_checkpoint
from tests.conftest import tiny_llama

CHILD = textwrap.dedent("""
    import sys, torch, lorafit
    from pathlib import Path
    from transformers import get_cosine_schedule_with_warmup
    from lorafit.train.checkpoint import Position, save_checkpoint
    from tests.conftest import tiny_llama
    folder = Path(sys.argv[1])
    model = tiny_llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10_000)
    step = 0
    print("ready", flush=True)
    while True:
        step += 1
        model(torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        save_checkpoint(folder / "checkpoints", Position(step, 0, step), model, "default", optimizer, scheduler,
                        names, keep=3)
        lorafit.save_adapter(model, folder / "adapter")
""")


def _fresh():
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(r=4, target_modules="all-linear"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, names, optimizer, get_cosine_schedule_with_warmup(optimizer, 1, 10_000)


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_during_saves_leaves_the_previous_checkpoints_intact(tmp_path, seed):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, cwd=".")
    assert child.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(seed).random())  # lands inside some save: the child does little else
    child.send_signal(signal.SIGKILL)
    child.wait()
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert checkpoints
    for checkpoint in checkpoints:
        model, names, optimizer, scheduler = _fresh()
        position = restore_checkpoint(read_checkpoint(checkpoint), model, optimizer, scheduler, names)
        assert position.step == int(checkpoint.name.split("-")[1])
    if (tmp_path / "adapter" / "adapter_config.json").exists():
        lorafit.load_adapter(tiny_llama(), tmp_path / "adapter")
