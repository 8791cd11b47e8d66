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


def make_model(dora: bool = False):
    model = tiny_llama(seed=0)
    lorafit.attach(model, lorafit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             use_dora=dora))
    return model


def settings_for(steps: int, variant: dict) -> LoopSettings:
    return LoopSettings(**{**SETTINGS, "steps": steps,
                           "gradient_checkpointing": variant.get("gradient_checkpointing", False)})


def adapter_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, port: int, run_dir: str, out_dir: str, resume: str | None, steps: int,
            variant: dict) -> None:
    from dataclasses import replace

    from lorafit.train import distributed
    from lorafit.train.fsdp import shard_frozen_base

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks = distributed.start("cpu", timeout_seconds=60)
    try:
        model = make_model(variant.get("dora", False))
        if variant.get("strategy") == "fsdp":
            ranks = replace(ranks, sharded_base=True)
            assert shard_frozen_base(model, ranks, torch.device("cpu")) == 2
            frozen = [p for p in model.parameters() if not p.requires_grad]
            # every frozen weight but the (tied) embedding is a shard: 1/W of its rows here
            shards = [p for p in frozen if type(p).__name__ == "DTensor"]
            assert len(shards) == len(frozen) - 1
            for shard in shards:  # dim-0 shards: at most ⌈rows / W⌉ rows of each weight held here
                assert shard.to_local().shape[0] <= -(-shard.shape[0] // world) < shard.shape[0]
        result = train(model, random_examples(40, seed=7), settings_for(steps, variant),
                       __import__("pathlib").Path(run_dir), pad_id=0, vocab_size=64, echo=lambda _: None,
                       ranks=ranks, resume=None if resume is None else __import__("pathlib").Path(resume))
        torch.save(adapter_state(model), f"{out_dir}/rank{rank}.pt")
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(result.losses, handle)
    finally:
        distributed.stop()


def run_processes(world: int, tmp_path, name: str, resume=None, steps: int = SETTINGS["steps"], variant=None):
    run_dir, out_dir = tmp_path / f"{name}-run", tmp_path / f"{name}-out"
    out_dir.mkdir()
    mp.spawn(_worker, args=(world, free_port(), str(run_dir), str(out_dir), resume, steps, variant or {}), nprocs=world,
             join=True)
    losses = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    states = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    return run_dir, losses, states


def one_process(tmp_path, steps: int = SETTINGS["steps"], variant=None):
    torch.set_num_threads(1)
    model = make_model((variant or {}).get("dora", False))
    result = train(model, random_examples(40, seed=7), settings_for(steps, variant or {}),
                   tmp_path / "single", pad_id=0, vocab_size=64, echo=lambda _: None)
    return result.losses, adapter_state(model)


@pytest.mark.parametrize(("world", "strategy"), [(2, "ddp"), (2, "fsdp"), pytest.param(3, "ddp", marks=pytest.mark.slow),
                                                 pytest.param(3, "fsdp", marks=pytest.mark.slow)])
def test_several_processes_train_as_one_process_with_the_same_global_batch(tmp_path, world, strategy):
    """fp32, gradient accumulation 2, micro-batches of 5 dealt over 2 or 3 ranks (uneven shares, so under FSDP2
    some ranks run padding calls): the same loss curve and the same adapter within 1e-5, on every rank; only
    rank 0 wrote the run folder."""
    single_losses, single_state = one_process(tmp_path)
    run_dir, losses, states = run_processes(world, tmp_path, f"w{world}", variant={"strategy": strategy})
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


@pytest.mark.parametrize("variant", [{"gradient_checkpointing": True}, pytest.param({"dora": True}, marks=pytest.mark.slow)],
                         ids=["checkpointing", "dora"])
def test_fsdp_with_activation_checkpointing_or_dora_trains_as_one_process(tmp_path, variant):
    """Layers recomputed in backward inside FSDP2's all-gathers, or DoRA's weight norm taken from the gathered
    weight: 2 processes over a sharded base still train as one process."""
    single_losses, single_state = one_process(tmp_path, variant=variant)
    _, losses, states = run_processes(2, tmp_path, "fsdp", variant={**variant, "strategy": "fsdp"})
    assert losses[0] == pytest.approx(single_losses, abs=1e-5) and losses[1] == losses[0]
    for name, tensor in single_state.items():
        torch.testing.assert_close(states[1][name], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_run_checkpointed_under_fsdp_resumes_under_ddp_on_the_same_curve(tmp_path):
    """The adapter is whole on every rank under FSDP2, so its checkpoints are one process's: DDP resumes them."""
    single_losses, single_state = one_process(tmp_path)
    run_dir, first, _ = run_processes(2, tmp_path, "first", variant={"strategy": "fsdp"})
    _, rest, states = run_processes(2, tmp_path, "rest", resume=str(run_dir / "checkpoints" / "step-000003"))
    assert first[0][:3] + rest[0] == pytest.approx(single_losses, abs=1e-5)
    for name, tensor in single_state.items():
        torch.testing.assert_close(states[0][name], tensor, atol=1e-5, rtol=1e-5)
