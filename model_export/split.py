"""`split`: cut an ONNX model into N stages at clean cuts balanced by measured cost, and prove the chain.

Order (as onnx's own `extract_model`): validate every argument, then build in a temporary directory
beside the output, then check; the directory is moved into place only when the chain is proven equal
to the whole model, so a failure never leaves a half-written pipeline.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import onnx

from model_export.dims import batch_axes, batch_first
from model_export.errors import ExportError
from model_export.graph import GraphIndex, extract
from model_export.manifest import (
    Manifest,
    Profile,
    StageCost,
    check_pipeline_name,
    stage_name,
)
from model_export.onnx_io import load_onnx
from model_export.partition import choose_cuts, moved_bytes
from model_export.pipeline_writer import StageModel, write_pipeline
from model_export.profile import Activation, activations, param_bytes, time_model
from model_export.proof import CHAIN_TOLERANCE, Proof, Tolerance
from model_export.verify import prove_pipeline

Balance = Literal["latency", "params"]
MB = 1_000_000
# What one MB a stage receives or sends costs it, in ms: `make bench-hop`'s added stage (binary, loopback, no mesh)
# costs 0.73 ms a MB on the 2-core AMD VM and 0.44 on the Xeon; each Envoy sidecar adds about 0.6. At 0.3 the
# reference model's block 2 convolution as a stage alone (9.6 MB across) and with its pooling (4.8 MB) came out
# within the timing noise of each other, and 4-stage splits chose either (`--transfer-ms-per-mb` sets it).
DEFAULT_TRANSFER_MS_PER_MB = 0.7
T = TypeVar("T")
Track = Callable[[Iterable[T], str], Iterable[T]]


def no_progress(items: Iterable[T], description: str) -> Iterable[T]:
    del description
    return items


@dataclass(frozen=True)
class Candidates:
    """The model, its clean cuts in order, and each cut tensor's value at batch 1."""

    model: onnx.ModelProto
    index: GraphIndex
    cuts: list[str]
    values: dict[str, Activation]
    structural: list[str]  # every single-tensor clean cut, including those the batch is not axis 0 of

    def boundaries(self) -> list[list[str]]:
        return [self.index.inputs, *[[c] for c in self.cuts], self.index.outputs]

    def extract(self, start: list[str], end: list[str], name: str) -> onnx.ModelProto:
        infos = {n: a.value_info() for n, a in self.values.items()}
        return extract(self.index, start, end, infos, name)

    def feeds(self, names: list[str]) -> dict:
        return {n: self.values[n].value for n in names}


def find_candidates(model: onnx.ModelProto, threads: int = 1) -> Candidates:
    """Clean cuts whose batch is axis 0 and only axis 0: a stage boundary the service can batch and serve.

    Recurrent layers export as loops over time-major tensors (`[seq, dir, batch, hidden]`); those are
    structurally clean single tensors but not boundaries a stage can be given, so they are not offered."""
    index = GraphIndex.build(model)
    structural = index.clean_cuts()
    values = activations(model, [*structural, *index.outputs], threads=threads)
    cuts = [t for t in structural if batch_first(values[t].dims)]
    return Candidates(model, index, cuts, values, structural)


def segment_costs(c: Candidates, balance: Balance, threads: int, runs: int, track: Track) -> list[float]:
    bounds = c.boundaries()
    pairs = list(zip(bounds, bounds[1:], strict=False))
    costs = []
    for i, (start, end) in enumerate(track(pairs, "measuring segments")):
        segment = c.extract(start, end, f"segment{i}")
        if balance == "params":
            costs.append(float(param_bytes(segment)))
        else:
            costs.append(time_model(segment, c.feeds(start), threads, runs))
    return costs


class StageTimer:
    """The time of the stage of segments a..b-1, timed as one stage (not its segments summed), plus its cuts'
    transfer as `partition.stage_costs` counts it; each span timed once."""

    def __init__(self, c: Candidates, cut_bytes: Sequence[int], threads: int, runs: int, per_byte: float) -> None:
        self.c, self.cut_bytes, self.threads, self.runs, self.per_byte = c, cut_bytes, threads, runs, per_byte
        self.bounds = c.boundaries()
        self.seen: dict[tuple[int, int], float] = {}

    def __call__(self, a: int, b: int) -> float:
        if (a, b) not in self.seen:
            stage = self.c.extract(self.bounds[a], self.bounds[b], f"span{a}_{b}")
            ms = time_model(stage, self.c.feeds(self.bounds[a]), self.threads, self.runs)
            self.seen[(a, b)] = ms + self.per_byte * moved_bytes(self.cut_bytes, a, b)
        return self.seen[(a, b)]


def refine_with_stage_times(picked: list[int], segments: int, timed: Callable[[int, int], float],
                            track: Track = no_progress, passes: int = 3, slack: float = 0.02,
                            cut_bytes: Sequence[int] | None = None, per_byte: float = 0.0) -> list[int]:
    """The cuts `picked` (cut i follows segment i) from the segments' summed times, moved where that makes the
    slowest stage, timed as a stage, faster by more than `slack`. Summed segments overstate a stage of many
    small ones: each segment timed apart pays a run's fixed cost and converts its activations to and from
    onnxruntime's blocked layout (MobileNetV3Small at 96 px, 88 segments: a cut whose segments summed 0.57 /
    0.44 ms timed 0.26 / 0.47 ms as stages). Only a cut beside the slowest stage moves, to where its two stages
    are most even (found by a binary search: one grows as the cut moves later, the other shrinks), and only for
    a real gain, so a cut chosen for its fewer bytes stays where the time is the same; passes repeat until
    none moves. `timed(a, b)`: the time of the stage of segments a .. b - 1; `cut_bytes` (what crosses after each
    segment) and `per_byte` (ms a byte costs a stage), where given, let a cut also move to another stage for fewer
    bytes at the same bottleneck (`_reseated`)."""
    edges = [0, *[i + 1 for i in picked], segments]
    settled = False
    for _ in track(list(range(passes)), "timing candidate stages"):
        if settled:
            continue  # nothing left to time; the bar still ends at its total, not at the pass that settled
        moved = False
        for j in range(1, len(edges) - 1):
            left, cut, right = edges[j - 1], edges[j], edges[j + 1]
            pair = max(timed(left, cut), timed(cut, right))
            if pair < _bottleneck(edges, timed) * (1 - slack):
                continue  # neither of its stages is the slowest: moving it gains nothing
            best = _even_point(left, right, timed)
            if max(timed(left, best), timed(best, right)) < pair * (1 - slack):
                edges[j], moved = best, True
        reseated = _reseated(edges, timed, slack, cut_bytes, per_byte)
        if reseated is not None:
            edges, moved = reseated, True
        settled = not moved
    return [e - 1 for e in edges[1:-1]]


def _bottleneck(edges: Sequence[int], timed: Callable[[int, int], float]) -> float:
    return max(timed(a, b) for a, b in zip(edges, edges[1:], strict=False))


def _reseated(edges: list[int], timed: Callable[[int, int], float], slack: float,
              cut_bytes: Sequence[int] | None, per_byte: float) -> list[int] | None:
    """The cuts with one cut taken out (its two stages merged) and one put into a stage where that moves fewer bytes
    and leaves the slowest stage no slower than `slack` more (the fewest such bytes); None where no move does, or the
    bytes are not known. The bytes saved must be worth more than the slack allows the bottleneck to grow (at
    `per_byte`), else timing noise decides: a small model's stages of microseconds are all within 2% of each other,
    whatever they hold. Moving one cut at a time cannot do this: summed segments can give a segment that costs
    nothing inside a stage (a pooling fused into its convolution's layout) a stage of its own, moving its large input
    across a cut for nothing, and every single move from there leaves the bottleneck where it is (the reference model
    in 4 stages: 11.2 MB crossing where 4.8 MB do, at the same bottleneck). Only bytes make such a move, never time
    alone: among the many candidates, the one timed fastest is as often the one whose timing erred lowest
    (microsecond stages of a small model went that way, into a stage of one ReLU)."""
    if cut_bytes is None or per_byte <= 0:
        return None

    def crossing(e: Sequence[int]) -> int:
        return sum(cut_bytes[x - 1] for x in e[1:-1])

    now, moved_now = _bottleneck(edges, timed), crossing(edges)
    best: tuple[int, list[int]] | None = None
    for j in range(1, len(edges) - 1):
        merged = edges[:j] + edges[j + 1:]
        for a, b in zip(merged, merged[1:], strict=False):
            for cut in _cuts_worth_trying(a, b, cut_bytes, (moved_now - crossing(merged)) * per_byte - slack * now,
                                          per_byte, timed):
                candidate = sorted([*merged, cut])
                moved = crossing(candidate)
                if best is not None and moved >= best[0]:
                    break  # the rest of this stage's cuts move more bytes still
                if _bottleneck(candidate, timed) <= now * (1 + slack):
                    best = (moved, candidate)
                    break  # this stage's fewest bytes that keep the bottleneck
    return None if best is None else best[1]


def _cuts_worth_trying(a: int, b: int, cut_bytes: Sequence[int], worth_ms: float, per_byte: float,
                       timed: Callable[[int, int], float], cheapest: int = 6) -> list[int]:
    """The boundaries inside the stage of segments a .. b - 1 whose cut saves more than `worth_ms` (the bytes of the
    merged cut, less the slack, in ms) fewest bytes first: the `cheapest` few in bytes and those within two segments
    of the stage's even point, each timed only when tried. The fewest bytes often lie far from the even point (the
    1 KB between block 3 and the head, four small segments past block 3's convolution); the even point's
    neighbours keep a stage with only large cuts near its balance."""
    inside = [cut for cut in range(a + 1, b) if cut_bytes[cut - 1] * per_byte < worth_ms]
    if not inside:
        return []  # no cut in this stage saves enough bytes: not worth timing its even point
    by_bytes = sorted(inside, key=lambda cut: (cut_bytes[cut - 1], cut))
    even = _even_point(a, b, timed)
    near_even = [cut for cut in inside if abs(cut - even) <= 2]
    return sorted(set(by_bytes[:cheapest]) | set(near_even), key=lambda cut: (cut_bytes[cut - 1], cut))


def pick_cuts(costs: Sequence[float], cut_bytes: Sequence[int], stages: int, per_byte: float,
              timed: Callable[[int, int], float] | None, track: Track = no_progress) -> list[int]:
    """The cuts (indices into the clean cuts) for `stages` stages: the partitioner's choice from the segments'
    costs, then, where `timed` gives a stage's time as a stage (latency balance), refined with it."""
    picked = choose_cuts(costs, cut_bytes, stages, transfer_per_byte=per_byte)
    return picked if timed is None else refine_with_stage_times(picked, len(costs), timed, track,
                                                                 cut_bytes=cut_bytes, per_byte=per_byte)


def _even_point(left: int, right: int, timed: Callable[[int, int], float]) -> int:
    """The boundary between `left` and `right` where the stages on either side are most even."""
    lo, hi = left + 1, right - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if timed(left, mid) < timed(mid, right):
            lo = mid + 1
        else:
            hi = mid
    return min({max(lo - 1, left + 1), lo}, key=lambda p: max(timed(left, p), timed(p, right)))


def validate_cuts(c: Candidates, requested: Sequence[str]) -> list[str]:
    """Check user-given cut tensors exist and are clean; return them ordered inputs -> outputs."""
    for name in requested:
        if name not in c.index.producer:
            sample = ", ".join(c.cuts[:5]) or "(none)"
            what = ("is an input of the model, not a tensor between its inputs and outputs"
                    if name in c.index.inputs else "no such tensor in the graph")
            raise ExportError(f"--cut {name!r}: {what}; clean cut points include: {sample}")
        crossing = c.index.crossing(name)
        if name in c.index.outputs or crossing:
            also = sorted(crossing) or ["(it is a graph output)"]
            raise ExportError(
                f"--cut {name!r} is not a clean cut: {also} would also cross it (a residual branch, a "
                "control-flow node or a second output); `python -m model_export cuts MODEL.onnx` lists the "
                f"clean ones, e.g. {c.cuts[:3]}"
            )
    for name in requested:
        if name not in c.cuts and name in c.structural:
            dims = c.values[name].dims
            axes = batch_axes(dims)
            if axes == [0]:
                why = (f"a dynamic dimension of it changes with the batch (dims {dims}; '?': e.g. batch x "
                       "sequence after a reshape), so its samples cannot be batched and split along axis 0 alone")
            else:
                where = f"its batch is axis {axes[0]}" if len(axes) == 1 else "it has no single batch axis"
                why = f"{where} (dims {dims}), as in a recurrent layer's time-major tensors"
            raise ExportError(f"--cut {name!r}: {why}; a stage boundary needs the batch as axis 0 alone. Clean cut "
                              f"points include: {c.cuts[:3]}")
    if len(set(requested)) != len(requested):
        raise ExportError(f"--cut lists a tensor twice: {list(requested)}")
    return sorted(requested, key=c.cuts.index)


@dataclass(frozen=True)
class SplitResult:
    manifest: Manifest
    directory: Path
    proof: Proof
    segment_costs: list[float]
    per_mb_ms: float | None = None  # what a MB across a cut was counted as costing a stage (latency balance)


def split_model(model_path: Path, out: Path, stages: int | None, cuts: Sequence[str] = (),
                balance: Balance = "latency", threads: int = 1, runs: int = 10, name: str | None = None,
                tolerance: Tolerance = CHAIN_TOLERANCE, samples: Path | None = None,
                per_mb_ms: float | None = None,
                track: Track = no_progress, external_data: bool = False) -> SplitResult:
    # 1. validate the arguments, before any heavy work
    if out.exists():
        raise ExportError(f"{out} already exists; expected a new directory (remove it or choose another --out)")
    pipeline = name or out.name
    try:
        check_pipeline_name(pipeline)
    except ValueError as exc:
        raise ExportError(f"pipeline name (from --name or the --out directory): {exc}") from exc
    if stages is not None and stages < 1:
        raise ExportError(f"--stages must be at least 1, got {stages}")
    if cuts and stages is not None and stages != len(cuts) + 1:
        raise ExportError(f"--stages {stages} needs {stages - 1} --cut tensors, got {len(cuts)}")
    if balance not in ("latency", "params"):
        raise ExportError(f"--balance must be latency or params, got {balance!r}")
    if threads < 1 or runs < 1:
        raise ExportError("--threads and --runs must be at least 1")
    if per_mb_ms is not None and not (math.isfinite(per_mb_ms) and per_mb_ms >= 0):
        raise ExportError(f"--transfer-ms-per-mb must be a number of milliseconds, 0 or more; got {per_mb_ms}")
    if samples is not None and not samples.is_file():
        raise ExportError(f"--samples {samples}: no such file; expected an .npz with one array per model input")
    model = load_onnx(model_path)
    c = find_candidates(model, threads)
    n_stages = stages if stages is not None else len(cuts) + 1
    costs: list[float] = []
    counted_per_mb: float | None = None
    if cuts:
        chosen = validate_cuts(c, cuts)
    elif n_stages == 1:
        chosen = []  # the whole model as one servable stage: nothing to balance
    else:
        if not c.cuts and not set(c.index.producer) - set(c.index.outputs):
            raise ExportError(f"{model_path}: no tensor lies between the inputs and the outputs (the model is one "
                              "step), so there is nothing to cut at; serve it whole with --stages 1")
        if not c.cuts:
            raise ExportError(
                f"{model_path}: no usable cut point: every tensor between the inputs and the outputs is crossed by "
                "another (residual branches, a recurrent loop) or has its batch off axis 0; serve it whole with "
                "--stages 1"
            )
        if n_stages - 1 > len(c.cuts):
            raise ExportError(
                f"--stages {n_stages}: the model has only {len(c.cuts)} clean cut points, so at most "
                f"{len(c.cuts) + 1} stages"
            )
        costs = segment_costs(c, balance, threads, runs, track)
        cut_bytes = [c.values[t].nbytes for t in c.cuts]
        if balance == "latency":
            counted_per_mb = per_mb_ms if per_mb_ms is not None else DEFAULT_TRANSFER_MS_PER_MB
        per_byte = (counted_per_mb or 0.0) / MB
        timer = StageTimer(c, cut_bytes, threads, runs, per_byte) if balance == "latency" else None
        chosen = [c.cuts[i] for i in pick_cuts(costs, cut_bytes, n_stages, per_byte, timer, track)]

    # 2. build in a temporary directory beside the output
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        manifest = _write_stages(c, chosen, tmp, pipeline, model_path, out, balance, threads, runs, track,
                                 external_data)
        # 3. check: the chained stages must compute what the whole model computes
        proof = prove_pipeline(tmp, model_path=model_path, samples=samples, tolerance=tolerance, track=track)
        make_readable(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SplitResult(manifest, out, proof, costs, counted_per_mb)


DIRECTORY_MODE = 0o755
FILE_MODE = 0o644


def make_readable(directory: Path) -> None:
    """Directories 0755 and files 0644 whatever the umask: `mkdtemp` makes 0700, and a stage container
    running as another user (UID 10001) must read the pipeline directory mounted into it."""
    directory.chmod(DIRECTORY_MODE)
    for path in directory.rglob("*"):
        path.chmod(DIRECTORY_MODE if path.is_dir() else FILE_MODE)


def _write_stages(c: Candidates, chosen: list[str], directory: Path, pipeline: str, model_path: Path, out: Path,
                  balance: Balance, threads: int, runs: int, track: Track, external_data: bool = False) -> Manifest:
    bounds = [c.index.inputs, *[[t] for t in chosen], c.index.outputs]
    stages = []
    for i, (start, end) in enumerate(track(list(zip(bounds, bounds[1:], strict=False)), "extracting stages")):
        sub = c.extract(start, end, stage_name(pipeline, i))
        try:
            onnx.checker.check_model(sub, full_check=True)
            sub = onnx.shape_inference.infer_shapes(sub, strict_mode=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"stage {i} ({start} -> {end}) fails the ONNX checker: {exc}") from exc
        cost = StageCost(latency_ms=round(time_model(sub, c.feeds(start), threads, runs), 4),
                         param_bytes=param_bytes(sub), bytes_out=sum(c.values[t].nbytes for t in end))
        stages.append(StageModel(sub, cost))
    return write_pipeline(directory, pipeline, stages, model_path,
                          profile=Profile(threads=threads, batch=1, runs=runs, balance=balance),
                          source_file=os.path.relpath(model_path.resolve(), out.resolve()),
                          external_data=external_data)
