"""`python -m model_export`: reference, export, cuts, split, verify, inspect, merge.

A thin command line over the library; every failure the user can cause prints one message naming what
was wrong and what was expected, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from model_export.cli_help import CommandParser, compact_table, console_width, fits
from model_export.errors import ExportError
from model_export.manifest import Manifest, ManifestError, load_manifest

T = TypeVar("T")
console = Console(width=console_width(sys.stdout))
err = Console(stderr=True, width=console_width(sys.stderr))


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
    values = [c.values[name].value for name in c.cuts]
    cuts = [(i, name, list(v.shape), int(v.nbytes)) for i, (name, v) in enumerate(zip(c.cuts, values, strict=True))]
    if args.json:
        print(json.dumps({"model": str(args.model), "cuts": [
            {"index": i, "tensor": name, "shape": shape, "bytes": size} for i, name, shape, size in cuts]}, indent=1))
        return 0
    console.print(f"{len(cuts)} clean cut points in {args.model} (shape and bytes at batch 1)", soft_wrap=True,
                  highlight=False)
    # Widest first; a tensor name is never wrapped (it is what `split --cut` takes): columns go, then the table.
    for columns in (("#", "tensor", "shape", "bytes"), ("#", "tensor", "bytes")):
        table = compact_table(*columns, right=("#", "bytes"))
        for i, name, shape, size in cuts:
            cells = {"#": str(i), "tensor": name, "shape": "x".join(map(str, shape)), "bytes": f"{size:,}"}
            table.add_row(*(cells[col] for col in columns))
        if fits(table, console.width):
            console.print(table)
            return 0
    for i, name, _, size in cuts:
        console.print(f"{i:>3} {size:>12,}  {name}", soft_wrap=True, highlight=False)
    return 0


def _print_stages(manifest: Manifest, as_json: bool) -> None:
    from model_export.report import stage_report, stage_rows

    if as_json:
        print(json.dumps({"pipeline": manifest.name, "stages": stage_rows(manifest)}, indent=1))
        return
    for part in stage_report(manifest, console.width):
        console.print(part, soft_wrap=True, highlight=False)


def cmd_split(args: argparse.Namespace) -> int:
    from model_export.split import split_model

    if args.stages is None and not args.cut:
        raise ExportError("give --stages N, or --cut TENSOR for each cut")
    r = split_model(args.model, args.out, args.stages, cuts=args.cut or (), balance=args.balance,
                    threads=args.threads, runs=args.runs, name=args.name, track=track)
    _print_stages(r.manifest, args.json)
    (err if args.json else console).print(
        f"wrote {r.directory}/pipeline.json and {len(r.manifest.stages)} stages; chained stages vs whole "
        f"model: max |diff| = {r.max_abs_diff:.3g} (limit 1e-05)", soft_wrap=True, highlight=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from model_export.verify import verify_pipeline

    diff = verify_pipeline(args.dir, model_path=args.model, samples=args.samples, track=track)
    console.print(f"{args.dir}: chained stages equal the whole model; max |diff| = {diff:.3g} (limit 1e-05)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from model_export.report import plot_stages

    manifest = load_manifest(args.dir)
    _print_stages(manifest, args.json)
    if args.plot:
        (err if args.json else console).print(f"wrote {plot_stages(manifest, args.plot)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from model_export.merge import merge_pipeline

    diff = merge_pipeline(args.dir, args.out, model_path=args.model)
    console.print(f"wrote {args.out}: merged stages vs original: max |diff| = {diff:.3g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m model_export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reference", help="build the reference image classifier (.keras; untrained, fixed seed)")
    p.add_argument("--out", type=Path, required=True, help="the .keras file to write")
    p.add_argument("--input-size", type=int, default=224, help="height and width of the RGB input image")
    p.add_argument("--width", type=int, default=64, help="filters of the first conv block (then x2, x4)")
    p.add_argument("--head", choices=["pool", "flatten"], default="pool",
                   help="global average pooling, or flatten (one large Dense layer no split can divide)")
    p.add_argument("--classes", type=int, default=1000, help="outputs of the softmax classifier")
    p.add_argument("--hidden-layers", type=int, default=0,
                   help="Dense+ReLU layers before the classifier (8: the large variant)")
    p.add_argument("--hidden-width", type=int, default=4096, help="units of each hidden Dense layer")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial weights")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("export", help="Keras -> ONNX with tf2onnx, verified against Keras")
    p.add_argument("model", type=Path, help="the Keras model (.keras)")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset to convert to")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |keras - onnxruntime| on a random batch; beyond it nothing is written")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cuts", help="list the clean cut points of an ONNX model")
    p.add_argument("model", type=Path, help="the ONNX model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_cuts)

    p = sub.add_parser("split", help="split an ONNX model into balanced stages and prove the chain")
    p.add_argument("model", type=Path, help="the ONNX model")
    p.add_argument("--stages", type=int, help="number of stages (or give --cut for each cut)")
    p.add_argument("--out", type=Path, required=True, help="the pipeline directory to create (must not exist)")
    p.add_argument("--cut", action="append", metavar="TENSOR",
                   help="cut at this tensor instead of choosing; repeat for several (see `cuts`)")
    p.add_argument("--balance", choices=["latency", "params"], default="latency",
                   help="what the stages are balanced on: measured latency or parameter bytes")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per stage, as the service runs it")
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement (the median is used)")
    p.add_argument("--name", help="pipeline name (default: the --out directory's name)")
    p.add_argument("--json", action="store_true", help="print the stage table as JSON")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("verify", help="prove the chained stages equal the whole model")
    p.add_argument("dir", type=Path, help="the pipeline directory (pipeline.json)")
    p.add_argument("--model", type=Path, help="the whole ONNX model (default: from the manifest)")
    p.add_argument("--samples", type=int, default=5, help="random input batches compared")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="table of the stages of a split")
    p.add_argument("dir", type=Path, help="the pipeline directory (pipeline.json)")
    p.add_argument("--plot", type=Path, help="also write a PNG of stage latency and bytes out")
    p.add_argument("--json", action="store_true", help="print the stage table as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="recompose the stages into one model and verify it")
    p.add_argument("dir", type=Path, help="the pipeline directory (pipeline.json)")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--model", type=Path, help="the whole ONNX model to compare with (default: from the manifest)")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow (reference, export) is imported later: quiet its start-up banners (oneDNN, absl).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ExportError, ManifestError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
