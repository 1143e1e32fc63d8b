"""`make bench-split`: how good are the chosen cuts, and what does splitting cost in-process?

For N = 2, 3, 4 stages of one model:
- bottleneck: the slowest chosen stage, measured as a whole stage, against the best bottleneck that an
  exhaustive search over every combination of clean cuts finds, each candidate stage measured the same
  way (target: within 5%);
- overhead: the sum of the chosen stages' latencies against the whole model's, same thread settings
  (target: at most 1.10x).
Writes bench-split.json, a table and bench-split.png.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import track as rich_track
from rich.table import Table

from benchmarks.sections import update_section
from loadtest.machine import describe
from model_export.onnx_io import load_onnx
from model_export.partition import exhaustive, moved_bytes
from model_export.profile import time_model
from model_export.split import (
    DEFAULT_TRANSFER_MS_PER_MB,
    MB,
    Candidates,
    StageTimer,
    find_candidates,
    no_progress,
    pick_cuts,
    segment_costs,
)

T = TypeVar("T")
err = Console(stderr=True)


def track(items: Iterable[T], description: str) -> Iterable[T]:
    """A progress bar over `items` on stderr."""
    return rich_track(items, description=description, console=err)


def stage_ranges(n: int, stage_counts: list[int]) -> set[tuple[int, int]]:
    """(first segment, last + 1) of every stage some choice of cuts makes, for these stage counts: with 2
    stages only the runs from the start and to the end (2n), with 3 or more every run (n^2 / 2)."""
    if any(k > 2 for k in stage_counts):
        return {(a, b) for a in range(n) for b in range(a + 1, n + 1)}
    return {(0, b) for b in range(1, n + 1)} | {(a, n) for a in range(n)}


def own_choices(c: Candidates, stage_counts: list[int], threads: int, runs: int,
                repeat: int) -> dict[int, list[list[str]]]:
    """`split`'s own choice of cuts for each N, made `repeat` times from scratch (its segment costs and its stage
    timings measured again each time): on a machine whose speed moves, the same model should still get the same
    cuts."""
    cut_bytes = [c.values[t].nbytes for t in c.cuts]
    per_byte = DEFAULT_TRANSFER_MS_PER_MB / MB
    choices: dict[int, list[list[str]]] = {n: [] for n in stage_counts}
    for _ in track(range(repeat), f"split's own choice, {repeat} times from scratch"):
        costs = segment_costs(c, "latency", threads, runs, no_progress)
        timer = StageTimer(c, cut_bytes, threads, runs, per_byte)
        for n in stage_counts:
            choices[n].append([c.cuts[i] for i in pick_cuts(costs, cut_bytes, n, per_byte, timer)])
    return choices


def run(model_path: Path, stage_counts: list[int], threads: int, runs: int, repeat: int = 3) -> dict:
    c = find_candidates(load_onnx(model_path), threads)
    bounds = c.boundaries()
    n = len(bounds) - 1
    costs = segment_costs(c, "latency", threads, runs, track)
    cut_bytes = [c.values[t].nbytes for t in c.cuts]
    # every contiguous run of segments a choice of cuts can make a stage of: measure each one once, as a stage
    ranges = sorted(stage_ranges(n, stage_counts))
    measured: dict[tuple[int, int], float] = {}
    for a, b in track(ranges, f"measuring all {len(ranges)} possible stages"):
        sub = c.extract(bounds[a], bounds[b], f"r{a}_{b}")
        measured[(a, b)] = time_model(sub, c.feeds(bounds[a]), threads, runs)
    whole = measured[(0, n)] if (0, n) in measured else time_model(c.model, c.feeds(bounds[0]), threads, runs)
    again = own_choices(c, stage_counts, threads, runs, repeat) if repeat else {}
    results = []
    per_byte = DEFAULT_TRANSFER_MS_PER_MB / MB

    def timed(a: int, b: int) -> float:  # as split's StageTimer counts a stage: measured, plus its cuts' transfer
        return measured[(a, b)] + per_byte * moved_bytes(cut_bytes, a, b)

    for stages in stage_counts:
        # the cuts `split` chooses, with the stage measurements above standing in for its own stage timings
        chosen = pick_cuts(costs, cut_bytes, stages, per_byte, timed)
        edges = [0, *[i + 1 for i in chosen], n]
        stage_ms = [measured[(a, b)] for a, b in zip(edges, edges[1:], strict=False)]
        best, best_cuts = exhaustive(n, stages, lambda a, b: measured[(a, b)])
        best_counted, _ = exhaustive(n, stages, timed)  # split's own objective: compute and transfer
        counted = max(timed(a, b) for a, b in zip(edges, edges[1:], strict=False))
        results.append({
            "stages": stages,
            "chosen_cuts": [c.cuts[i] for i in chosen],
            "stage_ms": stage_ms,
            "bottleneck_ms": max(stage_ms),
            "exhaustive_best_ms": best,
            "exhaustive_cuts": [c.cuts[i] for i in best_cuts],
            "bottleneck_ratio": max(stage_ms) / best,
            "sum_of_stages_ms": sum(stage_ms),
            "whole_ms": whole,
            "overhead_ratio": sum(stage_ms) / whole,
            "bytes_crossing": sum(cut_bytes[i] for i in chosen),
            "counted_bottleneck_ms": counted,
            "counted_best_ms": best_counted,
            "counted_ratio": counted / best_counted,
            "repeated_choices": again.get(stages, []),
        })
    return {"model": str(model_path), "machine": describe(), "threads": threads, "runs": runs,
            "clean_cuts": len(c.cuts), "per_mb_ms": DEFAULT_TRANSFER_MS_PER_MB, "results": results}


def table(report: dict) -> Table:
    t = Table(title=f"bench-split: {report['model']} ({report['clean_cuts']} clean cuts; {report['machine']}; "
                    f"{report['threads']} thread(s), median of {report['runs']} runs)")
    for col in ("N", "stage ms", "bottleneck ms", "exhaustive best ms", "ratio (<=1.05)", "sum of stages ms",
                "whole ms", "ratio (<=1.10)", "MB crossing", "transfer counted: chosen / best", "same cuts again"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        t.add_row(str(r["stages"]), " / ".join(f"{x:.2f}" for x in r["stage_ms"]), f"{r['bottleneck_ms']:.2f}",
                  f"{r['exhaustive_best_ms']:.2f}", f"{r['bottleneck_ratio']:.3f}", f"{r['sum_of_stages_ms']:.2f}",
                  f"{r['whole_ms']:.2f}", f"{r['overhead_ratio']:.3f}", f"{r['bytes_crossing'] / MB:.2f}",
                  counted_cell(r), sameness(r))
    return t


def markdown(report: dict) -> str:
    lines = ["## Split quality (make bench-split)", "",
             f"`{report['model']}`, {report['clean_cuts']} clean cuts; {report['machine']}; {report['threads']} "
             f"thread(s) per stage, median of {report['runs']} runs. Every possible stage (each run of consecutive "
             "segments) is measured as a stage; the exhaustive search picks the best cuts from those measurements. "
             "Transfer counted: the same two bottlenecks with each stage also paying "
             f"{report['per_mb_ms']} ms per MB across its cuts, as `split` counts "
             "them (its objective; the columns before count compute alone, so a cut `split` moves for fewer bytes "
             "shows there as a trade). Same cuts again: `split`'s own choice made again from scratch (its segment "
             "costs and stage timings measured anew), how many times of how many it made its most frequent choice.",
             "", "| N | stage ms | bottleneck ms | exhaustive best ms | ratio (target <= 1.05) | sum of stages ms "
             "| whole ms | ratio (target <= 1.10) | MB crossing | transfer counted: chosen / best ms (ratio) "
             "| same cuts again |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(
            f"| {r['stages']} | {' / '.join(f'{x:.2f}' for x in r['stage_ms'])} | {r['bottleneck_ms']:.2f} | "
            f"{r['exhaustive_best_ms']:.2f} | {r['bottleneck_ratio']:.3f} | {r['sum_of_stages_ms']:.2f} | "
            f"{r['whole_ms']:.2f} | {r['overhead_ratio']:.3f} | {r['bytes_crossing'] / MB:.2f} | {counted_cell(r)} | "
            f"{sameness(r)} |")
    return "\n".join(lines)


def counted_cell(result: dict) -> str:
    """The chosen and the best bottleneck counting transfer, as `split` does: "44.2 / 44.2 (1.000)"."""
    return f"{result['counted_bottleneck_ms']:.2f} / {result['counted_best_ms']:.2f} ({result['counted_ratio']:.3f})"


def sameness(result: dict) -> str:
    """How many of the repeated choices are the most frequent one: "3 of 3", or "-" where none were made."""
    choices = result.get("repeated_choices") or []
    return f"{max(choices.count(ch) for ch in choices)} of {len(choices)}" if choices else "-"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rs = report["results"]
    x = np.arange(len(rs))
    labels = [f"N={r['stages']}" for r in rs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(x - 0.2, [r["bottleneck_ms"] for r in rs], 0.4, label="chosen cuts")
    left.bar(x + 0.2, [r["exhaustive_best_ms"] for r in rs], 0.4, label="exhaustive best")
    left.set_title("slowest stage (bottleneck)")
    right.bar(x - 0.2, [r["sum_of_stages_ms"] for r in rs], 0.4, label="sum of stages")
    right.bar(x + 0.2, [r["whole_ms"] for r in rs], 0.4, label="whole model")
    right.set_title("sum of stage latencies vs whole model")
    for ax in (left, right):
        ax.set_xticks(x, labels)
        ax.set_ylabel("ms at batch 1")
        ax.legend(loc="lower right")
    fig.suptitle(f"bench-split: {Path(report['model']).name}, {report['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.split")
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, default=Path("build/bench-split"))
    parser.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3,
                        help="how many times split's own choice is made again from scratch (0: not at all)")
    args = parser.parse_args()
    report = run(args.model, args.stages, args.threads, args.runs, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-split.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "bench-split.png")
    Console(width=200).print(table(report))
    update_section(args.benchmarks, "bench-split", markdown(report))
    print(f"wrote {args.out}/bench-split.json, bench-split.png and its section of {args.benchmarks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
