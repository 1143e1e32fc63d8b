"""Latency percentiles, throughput and errors of a run, as JSON, a table and PNG plots."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from loadtest.runner import Sample
from model_export.cli_help import compact_table, fits

PERCENTILES = (50, 90, 99, 99.9)


def summarize(samples: list[Sample], duration_s: float, label: str = "") -> dict[str, Any]:
    ok = [s for s in samples if s.status == "200"]
    lat_ms = np.array([s.latency_s * 1000 for s in ok]) if ok else np.array([np.nan])
    # throughput over the span in which requests actually completed (a closed loop may overrun slightly)
    span = max([duration_s, *[s.intended_s + s.latency_s for s in samples]]) if samples else duration_s
    checked = [s.max_abs_diff for s in samples if s.max_abs_diff is not None]
    return {
        "label": label,
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(sorted(Counter(s.status for s in samples if s.status != "200").items())),
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "latency_ms": {f"p{p:g}": float(np.percentile(lat_ms, p)) for p in PERCENTILES}
        | {"mean": float(np.mean(lat_ms)), "max": float(np.max(lat_ms))},
        "checked": len(checked),
        "max_abs_diff": max(checked) if checked else None,
    }


def _cells(s: dict[str, Any]) -> dict[str, str]:
    lat = s["latency_ms"]
    errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
    checked = f"{s['checked']} ({s['max_abs_diff']:.1e})" if s["checked"] else "-"
    return {"run": s["label"], "requests": str(s["requests"]), "ok": str(s["ok"]),
            **{f"p{p:g} ms": f"{lat[f'p{p:g}']:.2f}" for p in PERCENTILES},
            "req/s": f"{s['throughput_rps']:.1f}", "errors": errors, "checked (max diff)": checked}


def table(summaries: list[dict[str, Any]], title: str, width: int = 10_000) -> Table:
    """The runs' table with as many columns as fit `width`: p90 and p99.9 go first, then `ok` (errors says
    what failed), then the check column (summary.json keeps everything)."""
    check = "checked (max diff)"
    every = ("run", "requests", "ok", *[f"p{p:g} ms" for p in PERCENTILES], "req/s", "errors", check)
    tails = ("p90 ms", "p99.9 ms")
    for dropped in ((), tails, (*tails, "ok"), (*tails, "ok", check)):
        columns = [c for c in every if c not in dropped]
        t = compact_table(*columns, right=tuple(c for c in columns if c not in ("run", "errors", check)))
        t.title, t.title_justify = title, "left"
        for s in summaries:
            cells = _cells(s)
            t.add_row(*(cells[c] for c in columns))
        if fits(t, width):
            break
    return t


def plot_run(samples: list[Sample], out: Path, title: str) -> Path:
    """Latency over time (errors in red) and the latency percentile curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ok = [s for s in samples if s.status == "200"]
    bad = [s for s in samples if s.status != "200"]
    left.scatter([s.intended_s for s in ok], [s.latency_s * 1000 for s in ok], s=4, label="200")
    if bad:
        left.scatter([s.intended_s for s in bad], [s.latency_s * 1000 for s in bad], s=8, color="red",
                     label="error")
    left.set_xlabel("intended send time, s")
    left.set_ylabel("latency, ms")
    left.set_title("latency over time")
    left.legend()
    if ok:
        lat = np.sort([s.latency_s * 1000 for s in ok])
        q = np.arange(1, len(lat) + 1) / len(lat)
        right.plot(1 / np.maximum(1 - q, 1e-4), lat)
        right.set_xscale("log")
        ticks = [2, 10, 100, 1000]
        right.set_xticks(ticks, ["p50", "p90", "p99", "p99.9"])
        right.set_xlim(1, 2000)
    right.set_ylabel("latency, ms")
    right.set_title("latency by percentile")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_sweep(summaries: list[dict[str, Any]], levels: list[int], out: Path, title: str) -> Path:
    """Throughput and p50/p99 latency against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(levels, [s["throughput_rps"] for s in summaries], marker="o")
    left.set_xlabel("concurrency")
    left.set_ylabel("requests / s")
    left.set_title("throughput")
    for p in ("p50", "p99"):
        right.plot(levels, [s["latency_ms"][p] for s in summaries], marker="o", label=p)
    right.set_xlabel("concurrency")
    right.set_ylabel("latency, ms")
    right.set_title("latency")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
