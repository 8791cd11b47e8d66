"""What every benchmark here shares: the machine line, the sgemm peak, min/median/max, FLOP counting.

The rules these follow are /work/shared/BENCHMARKS.md: ratios measured side by side in one run,
warm-up then >= 5 measured repetitions, peak RSS per configuration in its own process, useful FLOPs
against this machine's sgemm peak measured in the same run, real (non-padding) tokens only.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

SEED = 0
LR = 2e-4  # lorafit's default (LoopSettings.lr); both sides use it, constant (no schedule)
MAX_GRAD_NORM = 1.0  # lorafit's default clipping, and transformers Trainer's: both sides clip
SGEMM_SIZE = 2048


def machine_line() -> str:
    """CPU model, cores, torch version and threads, as BENCHMARKS.md asks for."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = _cpu_flags()
    simd = ", ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in flags) or "no AVX2"
    return (f"{cpu} ({simd}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"torch.get_num_threads() = {torch.get_num_threads()}")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def sgemm_gflops(reps: int = 1, size: int = SGEMM_SIZE) -> list[float]:
    """GFLOP/s of `reps` fp32 size^3 matmuls (2·size^3 FLOPs each), one sample per matmul."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)  # first call: allocation, thread-pool start
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        samples.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return samples


@dataclass
class Series:
    """Repeated measurements of one quantity; summarised as median (min–max)."""

    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def text(self, fmt: str = "{:.3g}") -> str:
        if not self.samples:
            return "—"
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}–{fmt.format(self.high)})"


@dataclass(frozen=True)
class MatmulParameters:
    """Parameters that take part in matmuls: the body's linear layers, the output head, the adapters; and
    the attention width (query heads × head size) and layer count for the causal attention's own work."""

    body: int
    head: int
    lora: int = 0
    attention_width: int = 0
    layers: int = 0

    def useful_flops(self, real_tokens: int, label_tokens: int, lengths: list[int] = ()) -> float:
        """One LoRA training step's useful work, per BENCHMARKS.md rule 4, plus causal attention.

        Forward 2·N·T + backward to the inputs 2·N·T for the frozen body over the real tokens, the same
        for the head but only over labelled positions, plus the adapters' forward and both backward
        matmuls (6·N_lora·T), plus each example's causal attention (attention_flops): necessary work
        that grows with the square of the length, so long examples are not made to look inefficient.
        """
        return (4 * self.body * real_tokens + 4 * self.head * label_tokens + 6 * self.lora * real_tokens
                + self.attention_flops(lengths))

    def attention_flops(self, lengths: list[int]) -> float:
        """Causal attention of examples of these lengths, forward and backward, every layer.

        Per layer, an n-token example has n(n+1)/2 query-key pairs: QKᵀ and the weighted sum over V take
        2·w FLOPs per pair each (w = query heads × head size), so the forward is 2·n(n+1)·w, and the
        backward (gradients to Q, K and V) twice that: 6·n(n+1)·w in all.
        """
        return sum(6 * n * (n + 1) * self.attention_width * self.layers for n in lengths)


def matmul_parameters(model: nn.Module) -> MatmulParameters:
    """Count N on a plain (not yet adapted) causal LM: every nn.Linear; the output embedding is the head."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    config = model.config
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    return MatmulParameters(body=body, head=head.weight.numel(), attention_width=heads * head_size,
                            layers=config.num_hidden_layers)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux).

    Linux keeps ru_maxrss across fork and exec: a child started by a parent that had grown to 8 GiB
    reports >= 8 GiB. So bench/run.py starts its memory children while it is still small, and each
    child also reports VmHWM (`high_water_rss_mib`), which starts afresh at exec.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field_name: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def high_water_rss_mib() -> float:
    """This address space's peak resident memory (VmHWM), which exec resets, unlike ru_maxrss."""
    return _status_mib("VmHWM")


def lorafit(*arguments: str) -> str:
    """Run the venv's `lorafit` command in its own process; its stdout, or an error with its stderr's end."""
    import subprocess
    import sys
    from pathlib import Path

    command = [str(Path(sys.executable).parent / "lorafit"), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"lorafit {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return done.stdout
