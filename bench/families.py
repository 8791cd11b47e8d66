"""A family whose logits are transformed after the head (Gemma 2's soft-cap): the label-only loss vs the model run whole.

Before issue 38 lorafit trained Gemma 2, Granite and Command-R through the model's own forward (logits at every
position, padded or packed rows, no shared prefix); now the label-only head applies the transform itself. This
measures both paths side by side, each configuration in its own process (peak RSS), on a Gemma 2 with
SmolLM2-135M's shapes (seeded random weights, fp32), LoRA r=8 on q and v, batches of 8 chat-like examples sharing
a 64-token prompt: 1 warm-up step, then 5 measured.

    .venv/bin/python bench/families.py            # writes bench/RESULTS-families.md
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import high_water_rss_mib, machine_line, today  # noqa: E402

STEPS, WARMUP, BATCH = 5, 1, 8
OUT = Path(__file__).with_name("RESULTS-families.md")


def gemma2_like_smollm():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=2048,
                          query_pre_attn_scalar=64, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                          sliding_window=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma2ForCausalLM(config).float()


def examples(count: int):
    from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 49152, (64,), generator=generator).tolist()
    made = []
    for _ in range(count):
        question = torch.randint(3, 49152, (int(torch.randint(16, 48, (1,), generator=generator)),),
                                 generator=generator).tolist()
        reply = torch.randint(3, 49152, (int(torch.randint(8, 32, (1,), generator=generator)),),
                              generator=generator).tolist()
        made.append(TokenizedExample(prompt + question + reply, [IGNORE_INDEX] * (64 + len(question)) + reply))
    return made


def run_one(path: str) -> dict:
    import lorafit
    from lorafit.train.output_head import _RUN_WHOLE
    from lorafit.train.step import choose_collate, train_step

    model = gemma2_like_smollm()
    lorafit.attach(model, lorafit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    if path == "whole":  # what lorafit did for Gemma 2 before: the model's own forward, every position's logits
        _RUN_WHOLE.add(model)
    said = []
    collate = choose_collate(model, 49152, pad_id=0, row_tokens=1024, gradient_checkpointing=False, echo=said.append)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=2e-4)
    data = examples(BATCH * (STEPS + WARMUP))
    times, tokens, losses = [], 0, []
    model.train()
    for step in range(STEPS + WARMUP):
        pieces = collate(data[step * BATCH:(step + 1) * BATCH])
        start = time.perf_counter()
        result = train_step(model, pieces, parameters, optimizer, max_grad_norm=1.0)
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
            tokens += result.real_tokens
        losses.append(round(result.loss, 6))
    layout = ("packed rows" + (", the shared prompt prefix once" if "prefix" in said[0] else "")
              + ("; the whole model's logits at every position" if "whole" in said[0] else "; the head on labels only"))
    return {"path": path, "layout": layout, "median_step_s": statistics.median(times), "min_step_s": min(times),
            "max_step_s": max(times), "tokens_per_s": tokens / sum(times), "peak_rss_mib": high_water_rss_mib(),
            "losses": losses}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2])))
        return
    results = []
    for path in ("label-only", "whole"):
        done = subprocess.run([sys.executable, __file__, "--one", path], check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    fast, whole = results
    lines = [f"# Gemma 2 (transformed logits): label-only loss vs the model run whole ({today()})", "",
             f"Machine: {machine_line()}", "", "Command: `.venv/bin/python bench/families.py`", "",
             "| path | layout lorafit chose | median step (min-max) | tokens/s | peak RSS |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['layout']} | {r['median_step_s']:.2f} s ({r['min_step_s']:.2f}-"
                     f"{r['max_step_s']:.2f}) | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} MiB |")
    lines += ["", f"Ratio: {whole['median_step_s'] / fast['median_step_s']:.2f}x faster per step, peak RSS "
              f"{fast['peak_rss_mib'] / whole['peak_rss_mib']:.2f}x. Losses per step (the same examples and seed): "
              f"label-only {fast['losses']}, whole {whole['losses']}.", ""]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
