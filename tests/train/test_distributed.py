"""Data-parallel training over gloo on this CPU: W processes with global batch B train exactly as one process
with batch B (lorafit.train.distributed)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import lorafit
from lorafit.train.loop import LoopSettings, train
from tests.conftest import random_examples, tiny_llama

SETTINGS = dict(steps=6, batch_size=5, grad_accum=2, lr=5e-3, warmup_steps=2, seed=3, save_every=3, row_tokens=8)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_model():
    model = tiny_llama(seed=0)
    lorafit.attach(model, lorafit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


def adapter_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, port: int, run_dir: str, out_dir: str, resume: str | None, steps: int) -> None:
    from lorafit.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks = distributed.start("cpu", timeout_seconds=60)
    try:
        model = make_model()
        result = train(model, random_examples(40, seed=7), LoopSettings(**{**SETTINGS, "steps": steps}),
                       __import__("pathlib").Path(run_dir), pad_id=0, vocab_size=64, echo=lambda _: None,
                       ranks=ranks, resume=None if resume is None else __import__("pathlib").Path(resume))
        torch.save(adapter_state(model), f"{out_dir}/rank{rank}.pt")
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(result.losses, handle)
    finally:
        distributed.stop()


def run_processes(world: int, tmp_path, name: str, resume=None, steps: int = SETTINGS["steps"]):
    run_dir, out_dir = tmp_path / f"{name}-run", tmp_path / f"{name}-out"
    out_dir.mkdir()
    mp.spawn(_worker, args=(world, free_port(), str(run_dir), str(out_dir), resume, steps), nprocs=world, join=True)
    losses = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    states = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    return run_dir, losses, states


def one_process(tmp_path, steps: int = SETTINGS["steps"]):
    torch.set_num_threads(1)
    model = make_model()
    result = train(model, random_examples(40, seed=7), LoopSettings(**{**SETTINGS, "steps": steps}),
                   tmp_path / "single", pad_id=0, vocab_size=64, echo=lambda _: None)
    return result.losses, adapter_state(model)


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_several_processes_train_as_one_process_with_the_same_global_batch(tmp_path, world):
    """fp32, gradient accumulation 2, micro-batches of 5 dealt over 2 or 3 ranks (uneven shares): the same
    loss curve and the same adapter within 1e-5, on every rank; only rank 0 wrote the run folder."""
    single_losses, single_state = one_process(tmp_path)
    run_dir, losses, states = run_processes(world, tmp_path, f"w{world}")
    for rank in range(world):
        assert losses[rank] == pytest.approx(single_losses, abs=1e-5)
        for name, tensor in single_state.items():
            torch.testing.assert_close(states[rank][name], tensor, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 7))  # one writer: no line twice
    assert [entry["loss"] for entry in logged] == pytest.approx(single_losses, abs=1e-5)


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_loss_curve_with_another_number_of_processes(tmp_path):
    """The step's examples do not depend on how many processes share them, so a run checkpointed by 2
    processes resumes with 3 (or 1) on the same curve."""
    single_losses, single_state = one_process(tmp_path)
    run_dir, first, _ = run_processes(2, tmp_path, "first")
    _, rest, states = run_processes(3, tmp_path, "rest", resume=str(run_dir / "checkpoints" / "step-000003"))
    assert first[0][:3] + rest[0] == pytest.approx(single_losses, abs=1e-5)
    for name, tensor in single_state.items():
        torch.testing.assert_close(states[0][name], tensor, atol=1e-5, rtol=1e-5)
