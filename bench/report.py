"""Turn the measurements into the issue's table (one row per figure) and write bench/RESULTS.md."""

from __future__ import annotations

from dataclasses import dataclass

from common import Series
from inference import ratio_series


@dataclass
class Row:
    figure: str
    goal: str
    lorafit: str
    peer: str
    ratio: str
    verdict: str
    notes: str = ""


def _verdict(value: float | None, ok) -> str:
    if value is None:
        return "not measured"
    return "meets goal" if ok(value) else "misses goal"


def _ms(series: Series) -> str:
    return series.text("{:.0f}").replace(" (", " ms (", 1) if series.samples else "—"


def _pct(series: Series) -> str:
    return series.text("{:.0%}") if series.samples else "—"


def training_rows(titles: dict, summaries: dict, memory: dict) -> list[Row]:
    """Throughput, memory, efficiency and loss-curve rows for every workload that has the measurement."""
    rows = []
    for key, summary in summaries.items():
        ratio = summary["ratio"]
        rows.append(Row(
            f"real tokens/s, {titles[key]}", "≥ 2.0× peft",
            summary["lorafit_tps"].text("{:.0f}"), summary["peft_tps"].text("{:.0f}"),
            ratio.text("{:.2f}×"), _verdict(ratio.median, lambda v: v >= 2.0),
            f"{len(ratio.samples)} paired steps, {summary['tokens']} tokens; Σtokens/Σtime ratio "
            f"{summary['aggregate_ratio']:.2f}×; peft's padding {summary['padding']:.0%} of its positions"))
    for key, pair in memory.items():
        a, b = pair["lorafit"], pair["peft"]
        value = a["peak_rss_mib"] / b["peak_rss_mib"]
        rise_a = a["peak_rss_mib"] - a["rss_before_steps_mib"]
        rise_b = b["peak_rss_mib"] - b["rss_before_steps_mib"]
        rows.append(Row(
            f"peak RSS, {titles[key]}", "≤ 0.5× peft", f"{a['peak_rss_mib']:.0f} MiB", f"{b['peak_rss_mib']:.0f} MiB",
            f"{value:.2f}×", _verdict(value, lambda v: v <= 0.5),
            f"VmHWM of one process each, {a['steps']} steps (warm-up + the largest measured batches; ru_maxrss "
            f"{a['ru_maxrss_mib']:.0f} / {b['ru_maxrss_mib']:.0f} MiB); above the loaded, adapted model: "
            f"lorafit +{rise_a:.0f} MiB, peft +{rise_b:.0f} MiB ({rise_a / rise_b:.2f}×)"))
    for key, summary in summaries.items():
        eff = summary["lorafit_eff"]
        rows.append(Row(
            f"useful FLOP/s ÷ sgemm peak, {titles[key]}", "≥ 75%", _pct(eff), _pct(summary["peft_eff"]),
            _pct(eff), _verdict(eff.median, lambda v: v >= 0.75),
            f"FLOPs actually executed ÷ peak: lorafit {_pct(summary['lorafit_exec'])}, "
            f"peft {_pct(summary['peft_exec'])}"))
    for key, summary in summaries.items():
        if "loss_delta" in summary:
            delta = summary["loss_delta"]
            rows.append(Row(
                f"loss curve vs peft, first {summary['loss_steps']} steps, {titles[key]}", "equal within 1e-3",
                "—", "—", f"max \\|Δ\\| = {delta:.1e}", _verdict(delta, lambda v: v <= 1e-3),
                "same seed, initial adapter weights, batches and order; per-step mean loss over label tokens"))
    return rows


def inference_rows(result: dict) -> list[Row]:
    rows = []
    for shape in ("prefill", "decode"):
        times = result["times"][shape]
        what = ("prefill 8×128 tokens" if shape == "prefill"
                else f"decode 8 rows × {result['decode_tokens'] // 8} new tokens")

        def median_ms(name):
            return _ms(Series([t * 1e3 for t in times.get(name, [])]))

        merged = ratio_series(times, "lorafit merged", "base")
        control = ratio_series(times, "base, second copy", "base")
        rows.append(Row(f"inference after merge ÷ base model, {what}", "1.00 ± 0.02 (time)",
                        median_ms("lorafit merged"), median_ms("base"), merged.text("{:.3f}"),
                        _verdict(merged.median if merged.samples else None, lambda v: abs(v - 1) <= 0.02),
                        f"peer column: the base model (plain transformers); control, a second copy of the base "
                        f"÷ base: {control.text('{:.3f}')}"))
        unmerged = ratio_series(times, "lorafit unmerged", "base")
        peft_unmerged = ratio_series(times, "peft unmerged", "base")
        rows.append(Row(f"inference unmerged (r=16 all-linear) ÷ base, {what}", "≤ 1.05 (time)",
                        median_ms("lorafit unmerged"), median_ms("base"), unmerged.text("{:.3f}"),
                        _verdict(unmerged.median if unmerged.samples else None, lambda v: v <= 1.05),
                        f"peer column: the base model; peft unmerged ÷ base: {peft_unmerged.text('{:.3f}')}"))
        if "lorafit 8 adapters, one per row" in times:
            mixed = ratio_series(times, "lorafit one adapter of 8", "lorafit 8 adapters, one per row")
            peft_mixed = ratio_series(times, "peft one adapter of 8", "peft 8 adapters, one per row")
            rows.append(Row(f"8 adapters mixed in one batch ÷ one adapter (throughput), {what}", "≥ 0.8×",
                            median_ms("lorafit 8 adapters, one per row"), median_ms("lorafit one adapter of 8"),
                            mixed.text("{:.2f}×"),
                            _verdict(mixed.median if mixed.samples else None, lambda v: v >= 0.8),
                            f"peer column: lorafit, one adapter active; peft's own figure "
                            f"(adapter_names=): {peft_mixed.text('{:.2f}×')}"))
        else:
            rows.append(Row(f"8 adapters mixed in one batch ÷ one adapter (throughput), {what}", "≥ 0.8×",
                            "not supported yet", median_ms("peft 8 adapters, one per row"), "—", "not supported yet",
                            "lorafit has no adapter_per_row; peer column: peft with adapter_names="))
    return rows


def markdown(rows: list[Row], header: dict, notes: list[str]) -> str:
    lines = [
        "# lorafit vs peft + transformers: side-by-side bench (issue 6)",
        "",
        f"- date: {header['date']}",
        f"- command: `{header['command']}`",
        f"- machine: {header['machine']}",
        f"- sgemm peak ({header['sgemm_size']}³ fp32 matmul, {header['sgemm_count']} samples spread over the run): "
        f"{header['sgemm']} GFLOP/s (median (min–max)); efficiency rows divide by the sample taken beside each step",
        f"- wall time of the whole bench: {header['wall_minutes']:.1f} min",
        "",
        "Every figure is a ratio of lorafit against its peer measured in this run, alternating A B A B after "
        "warm-up; cells read median (min–max). Peak RSS: each configuration in its own process.",
        "",
        "| figure | goal | lorafit | peer | ratio | verdict | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row.figure} | {row.goal} | {row.lorafit} | {row.peer} | {row.ratio} | {row.verdict} | "
                     f"{row.notes} |")
    lines += ["", "## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
