"""The loss curve as a PNG next to the adapter, drawn from the run's JSONL step log."""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.files import atomic_path


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """Training loss per step, and held-out loss where it was measured; None if the log is empty."""
    if not log_path.exists():
        return None
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]  # skipped steps (non-finite loss) have none
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    evals = [r for r in records if "loss" in r.get("eval", {})]
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "o-", label="held-out loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per label token)")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(png_path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot.close(figure)
    return png_path
