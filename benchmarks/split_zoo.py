"""`make bench-split` (zoo part): per zoo model, what export and split cost, and how good the chosen cuts are.

For each model of model_export.zoo: export time (tf2onnx + the proof against Keras), split time into 2
stages (cut search, segment measurements, extraction, the chain's proof), and for 2 and 3 stages the
chosen bottleneck against the exhaustive optimum (every possible stage measured as a stage, as
`benchmarks.split` does for the reference model). Writes bench-split-zoo.json and its BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.sections import update_section
from benchmarks.split import run as split_quality
from loadtest.machine import describe
from model_export import zoo
from model_export.export import export_keras
from model_export.split import split_model

STAGES = [2, 3]
# 3 stages need every run of segments measured (n^2 / 2 sessions); past this many segments only 2 stages
# (2n runs) are compared with the exhaustive optimum, to keep the bench to minutes on two cores.
MAX_SEGMENTS_FOR_3 = 24


def measure(name: str, work: Path, threads: int, runs: int) -> dict[str, Any]:
    keras_file = zoo.save(name, work / f"{name}.keras")
    start = time.perf_counter()
    exported = export_keras(keras_file, work / f"{name}.onnx")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    split = split_model(exported.path, work / f"zoo-{name}", 2, threads=threads, runs=runs)
    split_s = time.perf_counter() - start
    segments = len(split.segment_costs)
    quality = split_quality(exported.path, STAGES if segments <= MAX_SEGMENTS_FOR_3 else STAGES[:1], threads, runs)
    return {
        "model": name,
        "export_s": export_s,
        "split_2_s": split_s,
        "clean_cuts": quality["clean_cuts"],
        "degenerate_outputs": exported.proof.degenerate,
        "results": [{k: r[k] for k in ("stages", "bottleneck_ms", "exhaustive_best_ms", "bottleneck_ratio")}
                    for r in quality["results"]],
    }


def _cells(row: dict[str, Any]) -> list[str]:
    by_stages = {q["stages"]: q for q in row["results"]}
    return [f"{q['bottleneck_ms']:.2f} / {q['exhaustive_best_ms']:.2f} ({q['bottleneck_ratio']:.3f})"
            if (q := by_stages.get(n)) else f"not measured (> {MAX_SEGMENTS_FOR_3} segments)" for n in STAGES]


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="bench-split, zoo")
    for col in ("model", "cuts", "export s", "split(2) s", *[f"N={n} chosen / best ms" for n in STAGES]):
        t.add_column(col, justify="right")
    for r in rows:
        ratios = _cells(r)
        t.add_row(r["model"], str(r["clean_cuts"]), f"{r['export_s']:.1f}", f"{r['split_2_s']:.1f}", *ratios)
    return t


def markdown(report: dict[str, Any]) -> str:
    lines = ["## Split on the zoo (make bench-split)", "",
             f"Every model of `model_export.zoo` (weights=None); {report['machine']}; {report['threads']} thread(s) "
             f"per stage, median of {report['runs']} runs. Export: tf2onnx plus the proof against Keras. Split: "
             "into 2 stages, proof included. Bottleneck: the slowest chosen stage against the best any choice of "
             "clean cuts gives (ratio target <= 1.05). The machine is shared: at the start "
             f"{report['load_start']}, at the end {report['load']}. Under such load one model's run time varies "
             "several-fold from run to run (EfficientNetB0 whole, 1 thread, 10 runs: fastest 2.3 ms, median 9.5 ms "
             "at load 11), so the large models' ratios say as much about the machine as about the cuts; the "
             "small models' stages take microseconds, where a few microseconds of noise is a large ratio.", "",
             "| model | clean cuts | export s | split into 2 s | "
             + " | ".join(f"N={n}: chosen / exhaustive best ms (ratio)" for n in STAGES) + " |",
             "|---|---|---|---|" + "---|" * len(STAGES)]
    for r in report["models"]:
        cells = _cells(r)
        lines.append(f"| {r['model']} | {r['clean_cuts']} | {r['export_s']:.1f} | {r['split_2_s']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load() -> str:
    try:
        one, five, _ = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        return "unknown"
    return f"load average {one} (1 min), {five} (5 min)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.split_zoo", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=list(zoo.ZOO), default=list(zoo.ZOO))
    parser.add_argument("--out", type=Path, default=Path("build/bench-split"))
    parser.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    rows = []
    load_start = _load()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(measure(name, Path(tmp), args.threads, args.runs))
            Console(stderr=True).print(f"{name}: done")
    report = {"machine": describe(), "threads": args.threads, "runs": args.runs, "load_start": load_start,
              "load": _load(), "models": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-split-zoo.json").write_text(json.dumps(report, indent=2) + "\n")
    Console(width=200).print(table(rows))
    update_section(args.benchmarks, "bench-split-zoo", markdown(report))
    print(f"wrote {args.out}/bench-split-zoo.json and its section of {args.benchmarks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
