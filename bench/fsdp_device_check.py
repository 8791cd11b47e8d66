"""FSDP2 on a GPU (issue 17): `lorafit.train.fsdp` on CUDA and nccl, against the same model unsharded.

A GPU session is lent one GPU, and nccl takes one process per GPU, so this runs one process: a world of one,
where FSDP2 shards over a single rank. What it checks is the GPU path lorafit's CPU tests cannot reach: the
base read into CPU memory and `shard_frozen_base` moving the shards, the adapter and the head to the GPU over
a CUDA device mesh, nccl collectives, and training steps (bf16 autocast, fp32 adapters) that give the
unsharded model's losses. Prints one JSON object (and writes it to $OUT/fsdp_device_check.json when set).

    .venv/bin/python bench/fsdp_device_check.py            # ~1 min on a GPU
    .venv/bin/python bench/fsdp_device_check.py --device cpu   # the plumbing, over gloo
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import socket
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

import lorafit
from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample
from lorafit.train import distributed
from lorafit.train.fsdp import shard_frozen_base
from lorafit.train.step import layout_collate, train_step


def examples(count: int, vocab: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        length = rng.randint(64, 256)
        ids = [rng.randrange(vocab) for _ in range(length)]
        made.append(TokenizedExample(ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2:]))
    return made


def model_on_cpu(layers: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    lorafit.attach(model, lorafit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    return model


def run_steps(model, batches: list, device: torch.device, ranks) -> dict:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=2e-4)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    losses, seconds = [], []
    for micro in batches:
        started = time.perf_counter()
        losses.append(train_step(model, micro, parameters, optimizer, 1.0, ranks=ranks).loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"losses": losses, "median_step_s": sorted(seconds)[len(seconds) // 2],
            "weights_mib": before / 2**20, "step_peak_above_mib": (peak - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ranks = replace(distributed.Ranks(0, 1, 0), sharded_base=True)
    try:
        reference = model_on_cpu(args.layers, args.hidden)
        sharded = copy.deepcopy(reference)
        collate = layout_collate(0, 128, packed=True, shared_prefix=False)
        data = examples(8 * args.steps, 32000)
        batches = [collate(data[i:i + 8]) for i in range(0, len(data), 8)]
        plain = run_steps(reference.to(device), batches, device, None)
        reference.cpu()
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shard_frozen_base(sharded, ranks, device)  # from the CPU, as `lorafit train --strategy fsdp` does
        placed = {str(p.device) for p in sharded.parameters()}
        fsdp = run_steps(sharded, batches, device, ranks)
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "backend": dist.get_backend(), "parameters_on": sorted(placed),
                  "unsharded": plain, "fsdp": fsdp,
                  "max_loss_difference": max(abs(a - b) for a, b in zip(plain["losses"], fsdp["losses"]))}
    finally:
        dist.destroy_process_group()
    text = json.dumps(result, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fsdp_device_check.json").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
