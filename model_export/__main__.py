"""`python -m model_export`: reference, export, cuts, split, verify, inspect, merge.

A thin command line over the library; every failure the user can cause prints one message naming what
was wrong and what was expected, and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from model_export.errors import ExportError
from model_export.manifest import ManifestError, load_manifest

T = TypeVar("T")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def track(items: Iterable[T], description: str) -> Iterable[T]:
    """A progress bar over `items` on stderr."""
    seq = list(items)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        yield from progress.track(seq, total=len(seq), description=description)


def cmd_reference(args: argparse.Namespace) -> int:
    from model_export.reference import save_reference

    path = save_reference(args.out, input_size=args.input_size, width=args.width, head=args.head,
                          classes=args.classes, hidden_layers=args.hidden_layers, hidden_width=args.hidden_width,
                          seed=args.seed)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model_export.export import export_keras

    with err.status("converting with tf2onnx and comparing with Keras"):
        r = export_keras(args.model, args.out, opset=args.opset, tolerance=args.tolerance)
    console.print(f"wrote {r.path}: inputs {r.inputs}, outputs {r.outputs}; max |keras - onnxruntime| = "
                  f"{r.max_abs_diff:.3g} (tolerance {r.tolerance:g})")
    return 0


def cmd_cuts(args: argparse.Namespace) -> int:
    from model_export.onnx_io import load_onnx
    from model_export.split import find_candidates

    c = find_candidates(load_onnx(args.model))
    table = Table(title=f"{len(c.cuts)} clean cut points in {args.model}")
    table.add_column("#", justify="right")
    table.add_column("tensor", overflow="fold")
    table.add_column("shape (batch 1)")
    table.add_column("bytes", justify="right")
    for i, name in enumerate(c.cuts):
        value = c.values[name].value
        table.add_row(str(i), name, str(list(value.shape)), f"{value.nbytes:,}")
    console.print(table)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from model_export.report import stage_table
    from model_export.split import split_model

    if args.stages is None and not args.cut:
        raise ExportError("give --stages N, or --cut TENSOR for each cut")
    r = split_model(args.model, args.out, args.stages, cuts=args.cut or (), balance=args.balance,
                    threads=args.threads, runs=args.runs, name=args.name, track=track)
    console.print(stage_table(r.manifest))
    console.print(f"wrote {r.directory}/pipeline.json and {len(r.manifest.stages)} stages; chained stages vs whole "
                  f"model: max |diff| = {r.max_abs_diff:.3g} (limit 1e-05)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from model_export.verify import verify_pipeline

    diff = verify_pipeline(args.dir, model_path=args.model, samples=args.samples, track=track)
    console.print(f"{args.dir}: chained stages equal the whole model; max |diff| = {diff:.3g} (limit 1e-05)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from model_export.report import plot_stages, stage_table

    manifest = load_manifest(args.dir)
    console.print(stage_table(manifest))
    if args.plot:
        console.print(f"wrote {plot_stages(manifest, args.plot)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from model_export.merge import merge_pipeline

    diff = merge_pipeline(args.dir, args.out, model_path=args.model)
    console.print(f"wrote {args.out}: merged stages vs original: max |diff| = {diff:.3g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reference", help="build the reference image classifier (.keras)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--width", type=int, default=64, help="filters of the first block (then x2, x4)")
    p.add_argument("--head", choices=["pool", "flatten"], default="pool",
                   help="flatten gives a much larger Dense layer (memory tests)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--hidden-layers", type=int, default=0, help="Dense+ReLU layers before the classifier")
    p.add_argument("--hidden-width", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("export", help="Keras -> ONNX with tf2onnx, verified against Keras")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cuts", help="list the clean cut points of an ONNX model")
    p.add_argument("model", type=Path)
    p.set_defaults(func=cmd_cuts)

    p = sub.add_parser("split", help="split an ONNX model into balanced stages and prove the chain")
    p.add_argument("model", type=Path)
    p.add_argument("--stages", type=int)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cut", action="append", metavar="TENSOR", help="cut here instead of choosing (repeat)")
    p.add_argument("--balance", choices=["latency", "params"], default="latency")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per stage, as the service runs it")
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement")
    p.add_argument("--name", help="pipeline name (default: the --out directory's name)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("verify", help="prove the chained stages equal the whole model")
    p.add_argument("dir", type=Path)
    p.add_argument("--model", type=Path, help="the whole ONNX model (default: from the manifest)")
    p.add_argument("--samples", type=int, default=5)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="table of the stages of a split")
    p.add_argument("dir", type=Path)
    p.add_argument("--plot", type=Path, help="also write a PNG of stage latency and bytes out")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="recompose the stages into one model and verify it")
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, help="the whole ONNX model (default: from the manifest)")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ExportError, ManifestError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
