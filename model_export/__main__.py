"""`python -m model_export`: reference, zoo, export, cuts, split, verify, inspect, merge, check-contract.

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
from model_export.contract import ContractReport, check_contract
from model_export.errors import ExportError
from model_export.manifest import Manifest, ManifestError, load_manifest
from model_export.proof import CHAIN_TOLERANCE, EXPORT_TOLERANCE, Tolerance

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


def cmd_zoo(args: argparse.Namespace) -> int:
    from model_export import zoo

    path = zoo.save(args.name, args.out, seed=args.seed)
    console.print(f"wrote {path}: {zoo.ZOO[args.name].__doc__}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model_export.export import export_keras

    with err.status("converting with tf2onnx and comparing with Keras"):
        r = export_keras(args.model, args.out, opset=args.opset, tolerance=Tolerance(args.rtol, args.atol),
                         samples=args.samples, unsafe=args.unsafe)
    console.print(f"wrote {r.path}: inputs {r.inputs}, outputs {r.outputs}", soft_wrap=True, highlight=False)
    console.print(f"keras vs onnxruntime: {r.proof.summary()}", soft_wrap=True, highlight=False)
    return 0


def cmd_cuts(args: argparse.Namespace) -> int:
    from model_export.onnx_io import load_onnx
    from model_export.profile import MEASURE_LENGTH, MEASURE_SPATIAL
    from model_export.split import find_candidates

    c = find_candidates(load_onnx(args.model))
    values = [c.values[name] for name in c.cuts]
    cuts = [(i, name, a.dims, list(a.value.shape), a.nbytes) for i, (name, a) in enumerate(zip(c.cuts, values,
                                                                                                  strict=True))]
    left_out = len(c.structural) - len(c.cuts)
    if args.json:
        print(json.dumps({"model": str(args.model), "cuts": [
            {"index": i, "tensor": name, "dims": dims, "shape": shape, "bytes": size}
            for i, name, dims, shape, size in cuts], "not_offered": left_out}, indent=1))
        return 0
    console.print(f"{len(cuts)} clean cut points in {args.model} (shape and bytes at batch 1, other dynamic dims at "
                  f"{MEASURE_LENGTH}, an image's height and width at {MEASURE_SPATIAL})", soft_wrap=True,
                  highlight=False)
    _print_cuts(cuts)
    if left_out:
        console.print(f"{left_out} more single-tensor cut(s) not offered: the batch is not their axis 0 alone (e.g. "
                      "a recurrent layer's time-major tensors)", soft_wrap=True, highlight=False)
    return 0


def _print_cuts(cuts: list[tuple[int, str, list[int | str], list[int], int]]) -> None:
    # Widest first; a tensor name is never wrapped (it is what `split --cut` takes): columns go, then the table.
    widest = ("#", "tensor", "dims", "shape", "bytes")
    for columns in (widest, ("#", "tensor", "shape", "bytes"), ("#", "tensor", "bytes")):
        table = compact_table(*columns, right=("#", "bytes"))
        for i, name, dims, shape, size in cuts:
            cells = {"#": str(i), "tensor": name, "dims": "(" + ", ".join(map(str, dims)) + ")",
                     "shape": "x".join(map(str, shape)), "bytes": f"{size:,}"}
            table.add_row(*(cells[col] for col in columns))
        if fits(table, console.width):
            console.print(table)
            return
    for i, name, _, _, size in cuts:
        console.print(f"{i:>3} {size:>12,}  {name}", soft_wrap=True, highlight=False)


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
                    threads=args.threads, runs=args.runs, name=args.name, samples=args.samples,
                    tolerance=Tolerance(args.rtol, args.atol), track=track, external_data=args.external_data,
                    per_mb_ms=args.transfer_ms_per_mb)
    _print_stages(r.manifest, args.json)
    (err if args.json else console).print(
        f"wrote {r.directory}/pipeline.json and {len(r.manifest.stages)} stages; chained stages vs whole "
        f"model: {r.proof.summary()}", soft_wrap=True, highlight=False)
    if r.per_mb_ms is not None:
        (err if args.json else console).print(
            f"balanced counting {r.per_mb_ms:.2f} ms per MB a stage receives or sends", highlight=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from model_export.verify import prove_pipeline

    proof = prove_pipeline(args.dir, model_path=args.model, samples=args.samples,
                           tolerance=Tolerance(args.rtol, args.atol), track=track)
    console.print(f"{args.dir}: chained stages equal the whole model: {proof.summary()}", soft_wrap=True,
                  highlight=False)
    return 0


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def cmd_inspect(args: argparse.Namespace) -> int:
    from model_export.report import plot_stages

    manifest = load_manifest(args.dir)
    _print_stages(manifest, args.json)
    if args.plot:
        if args.plot.suffix.lower() not in PLOT_SUFFIXES:
            raise ExportError(f"--plot {args.plot}: expected a file ending in one of {', '.join(PLOT_SUFFIXES)}")
        try:
            written = plot_stages(manifest, args.plot)
        except OSError as exc:
            raise ExportError(f"--plot {args.plot}: cannot write it ({exc.strerror or exc})") from exc
        (err if args.json else console).print(f"wrote {written}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from model_export.merge import merge_pipeline

    proof = merge_pipeline(args.dir, args.out, model_path=args.model, samples=args.samples,
                           tolerance=Tolerance(args.rtol, args.atol))
    console.print(f"wrote {args.out}: merged stages vs original: {proof.summary()}", soft_wrap=True, highlight=False)
    return 0


def cmd_check_contract(args: argparse.Namespace) -> int:

    report = check_contract(args.old, args.new)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        _print_contract(report)
    if not report.fits:
        err.print(f"[bold red]error:[/] {escape(str(args.new))} does not fit beside {escape(str(args.old))}: "
                  + escape("; ".join(report.reasons())), highlight=False, soft_wrap=True)
        return 2
    return 0


def cmd_reference_data(args: argparse.Namespace) -> int:
    from model_export.keras_source import as_functional, load_keras
    from model_export.training_data import write_reference_data

    path = write_reference_data(as_functional(load_keras(args.model)), args.out, args.samples, args.seed)
    console.print(f"wrote {path}: {args.samples} labelled samples (seed {args.seed})", highlight=False)
    return 0


def cmd_retrain_stage(args: argparse.Namespace) -> int:
    from model_export.retrain import TrainingOptions, retrain_stage
    from model_export.retrain_progress import EpochProgress

    options = TrainingOptions(args.epochs, args.learning_rate, args.batch_size, args.seed)

    def show_layers(stage: str, layers: list[str]) -> None:
        err.print(f"training {', '.join(layers)} of {stage}; every other layer frozen", highlight=False)

    r = retrain_stage(args.dir, args.stage, args.model, args.data, args.out, options,
                      callbacks=[EpochProgress(err, args.epochs)], track=track, on_layers=show_layers,
                      layer=args.layer)
    stage = r.manifest.stage(r.stage)
    console.print(f"loss on the data: {r.loss_before:.4f} before, {r.loss_after:.4f} after", highlight=False)
    console.print(f"wrote {args.out}: {r.stage} {r.version} ({stage.file}); every other stage byte-identical "
                  "(sha256); check-contract: fits", soft_wrap=True, highlight=False)
    return 0


def _print_contract(report: ContractReport) -> None:
    table = compact_table("stage", "old", "new", "bytes", "fits")
    for s in report.stages:
        table.add_row(s.name, s.old_version or "-", s.new_version, "changed" if s.changed else "same",
                      "yes" if s.fits else "NO")
    console.print(table)
    for reason in report.reasons():
        console.print(f"- {reason}", soft_wrap=True, highlight=False)
    changed = ", ".join(report.changed) or "none"
    console.print(f"changed stages: {changed}", soft_wrap=True, highlight=False)


def add_proof_options(p: argparse.ArgumentParser, tolerance: Tolerance, against: str) -> None:
    """The proof's options, the same on every command that proves something (see model_export.proof)."""
    p.add_argument("--rtol", type=float, default=tolerance.rtol, help=f"relative tolerance against {against}")
    p.add_argument("--atol", type=float, default=tolerance.atol, help=f"absolute tolerance against {against}")
    p.add_argument("--samples", type=Path, metavar="FILE.npz",
                   help="prove on these inputs (np.savez, one array per model input, the batch first) instead of "
                        "generated ones (each input's realistic ranges, batches 1 and 4, several lengths)")


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

    from model_export.zoo import ZOO

    p = sub.add_parser("zoo", help="write one of the zoo's small Keras models (weights=None) to try the tools on")
    p.add_argument("name", choices=list(ZOO), help="which model")
    p.add_argument("--out", type=Path, required=True, help="the .keras (or .h5) file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial weights")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("export", help="Keras -> ONNX with tf2onnx, proven against Keras")
    p.add_argument("model", type=Path, help="the Keras model: .keras, .h5, or a SavedModel directory")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset to convert to")
    p.add_argument("--unsafe", action="store_true",
                   help="load with Keras's safe mode off, as a Lambda layer needs: runs the file's Python code, so "
                        "only for files you trust")
    add_proof_options(p, EXPORT_TOLERANCE, "Keras; beyond it nothing is written")
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
    p.add_argument("--transfer-ms-per-mb", type=float, metavar="MS",
                   help="what a MB a stage receives or sends costs it, for --balance latency (default 0.7; `make "
                        "bench-hop` measures an added stage's cost per MB on your machine, and a mesh's sidecars "
                        "add to it): more makes the cuts favour small activations")
    p.add_argument("--name", help="pipeline name (default: the --out directory's name)")
    p.add_argument("--external-data", action="store_true",
                   help="write each stage's weights into stage-<i>.onnx.data beside it: the stage service then maps "
                        "them instead of copying them (lower peak memory, pages shared between replicas)")
    p.add_argument("--json", action="store_true", help="print the stage table as JSON")
    add_proof_options(p, CHAIN_TOLERANCE, "the whole model")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("verify", help="prove the chained stages equal the whole model")
    p.add_argument("dir", type=Path, help="the pipeline directory (pipeline.json)")
    p.add_argument("--model", type=Path, help="the whole ONNX model (default: from the manifest)")
    add_proof_options(p, CHAIN_TOLERANCE, "the whole model")
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
    add_proof_options(p, CHAIN_TOLERANCE, "the whole model")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("reference-data", help="a seeded synthetic labelled data set (.npz) for a classifier")
    p.add_argument("--model", type=Path, required=True, help="the Keras classifier (.keras) to make data for")
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (the input's name, and labels)")
    p.add_argument("--samples", type=int, default=512, help="number of labelled samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the class patterns, labels and noise")
    p.set_defaults(func=cmd_reference_data)

    p = sub.add_parser("retrain-stage", help="fine-tune one stage's layers and write it as a new stage version")
    p.add_argument("dir", type=Path, help="the pipeline directory (pipeline.json)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", help="the stage to retrain, by name (see `inspect`)")
    which.add_argument("--layer", help="or the stage holding this Keras layer's weights (e.g. the head's Dense): "
                                       "where a split by measured time put it")
    p.add_argument("--model", type=Path, required=True, help="the Keras model the pipeline was exported from")
    p.add_argument("--data", type=Path, required=True,
                   help="inputs and labels (.npz: one array per model input, and labels)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="samples per training step")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffling and the optimizer")
    p.add_argument("--out", type=Path, required=True, help="the new pipeline directory (must not exist)")
    p.set_defaults(func=cmd_retrain_stage)

    p = sub.add_parser("check-contract", help="would the new pipeline's stages fit beside the old one's?")
    p.add_argument("old", type=Path, help="the pipeline directory being served (pipeline.json)")
    p.add_argument("new", type=Path, help="the pipeline directory to roll out (pipeline.json)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=cmd_check_contract)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow (reference, export) is imported later: quiet its start-up banners (oneDNN, absl).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ExportError, ManifestError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # one line, unbroken
        return 2


if __name__ == "__main__":
    sys.exit(main())
