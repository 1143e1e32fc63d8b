"""The model runtime: one onnxruntime session serving one stage, kept apart from the web layer.

`load_stage(settings)` does every start-up check (manifest, stage name, next URL, the ONNX file's sha256
or, for a canary `STAGE_FILE`, its fit to the manifest's tensors) and raises `StartupError` naming the
setting at fault. The data plane calls `StageRuntime.check_inputs` (inputs against the manifest) and then
`StageRuntime.infer`, which runs the session on a dedicated thread, off the event loop, except a short run of a
request alone in the stage, which the event loop makes itself (`StageRuntime.runs_inline`); with dynamic batching
on (`STAGE_MAX_BATCH_SIZE` > 1) it queues the request for `batching.DynamicBatcher` instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_export.manifest import (
    DATATYPE_TO_NUMPY,
    Manifest,
    ManifestError,
    Stage,
    TensorSpec,
    load_manifest,
    verify_stage_file,
)
from model_export.ort_session import serving_options
from stage_service.batching import DynamicBatcher
from stage_service.errors import InferenceFailed, InvalidInput, StartupError
from stage_service.settings import StageSettings

log = logging.getLogger("stage_service")

# onnxruntime's type strings for the KServe datatypes the manifest may name.
ORT_TO_DATATYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


@dataclass(frozen=True)
class StagePlace:
    """Where this stage sits in the pipeline, as the manifest says."""

    manifest: Manifest
    stage: Stage
    index: int
    version: str
    file: Path

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == len(self.manifest.stages) - 1

    @property
    def next_stage(self) -> Stage | None:
        return None if self.is_last else self.manifest.stages[self.index + 1]


def resolve_providers(requested: list[str]) -> list[str]:
    """Execution providers in order; 'auto' is CUDA first where onnxruntime-gpu finds a GPU, then CPU."""
    available = ort.get_available_providers()
    if requested == ["auto"]:
        chosen = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    else:
        missing = [p for p in requested if p not in available]
        if missing:
            raise StartupError(f"STAGE_PROVIDERS: {missing} not available in this onnxruntime; available: {available}")
        chosen = list(requested)
    if "CUDAExecutionProvider" in chosen and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu[cuda,cudnn] (the GPU image) ships CUDA and cuDNN as pip packages: load them first.
        # Without a GPU, session creation falls back to the next provider (CPU) and says so in the log.
        try:
            ort.preload_dlls()
        except Exception as exc:
            log.warning("onnxruntime.preload_dlls failed (%s); relying on system CUDA libraries", exc)
    return chosen


def locate_stage(settings: StageSettings) -> StagePlace:
    """Read the manifest and find this stage; check the next URL fits its place and the file is right."""
    try:
        manifest = load_manifest(settings.manifest)
    except ManifestError as exc:
        raise StartupError(f"STAGE_MANIFEST: {exc}") from None
    try:
        stage = manifest.stage(settings.name)
    except KeyError as exc:
        raise StartupError(f"STAGE_NAME: {exc.args[0]}") from None
    index = manifest.index(stage.name)
    last = index == len(manifest.stages) - 1
    if last and settings.next_url:
        raise StartupError(f"STAGE_NEXT_URL: {stage.name} is the last stage and forwards nowhere; unset it")
    if not last and not settings.next_url:
        raise StartupError(
            f"STAGE_NEXT_URL: {stage.name} is stage {index} of {len(manifest.stages)}; set the base URL of "
            f"{manifest.stages[index + 1].name}"
        )
    directory = settings.manifest if settings.manifest.is_dir() else settings.manifest.parent
    if settings.file is not None:
        if not settings.file.is_file():
            raise StartupError(f"STAGE_FILE: {settings.file} is not a file")
        path = settings.file
    else:
        try:
            path = verify_stage_file(directory, stage)
        except ManifestError as exc:
            raise StartupError(f"STAGE_MANIFEST: refusing to start: {exc}") from None
    return StagePlace(manifest=manifest, stage=stage, index=index, version=settings.version or stage.version,
                      file=path)


def _dims_fit(file_shape: list[Any], spec: TensorSpec, is_input: bool) -> bool:
    if len(file_shape) != len(spec.shape):
        return False
    for actual, declared in zip(file_shape, spec.shape, strict=True):
        fixed = isinstance(actual, int) and actual >= 0
        if fixed and declared != -1 and actual != declared:
            return False
        # An input the manifest calls dynamic must be dynamic in the file too: neighbours may send any size.
        if fixed and declared == -1 and is_input:
            return False
    return True


def check_contract(session: ort.InferenceSession, stage: Stage, setting: str) -> None:
    """The file's inputs and outputs must be the manifest stage's: names, datatypes, compatible shapes."""
    problems: list[str] = []
    for kind, args, specs in (("input", session.get_inputs(), stage.inputs), ("output", session.get_outputs(),
                                                                               stage.outputs)):
        actual = {a.name: a for a in args}
        declared = {s.name: s for s in specs}
        if set(actual) != set(declared):
            problems.append(f"{kind}s are {sorted(actual)} in the file but {sorted(declared)} in the manifest")
            continue
        for name, spec in declared.items():
            datatype = ORT_TO_DATATYPE.get(actual[name].type, actual[name].type)
            if datatype != spec.datatype:
                problems.append(f"{kind} {name} is {datatype} in the file but {spec.datatype} in the manifest")
            if not _dims_fit(list(actual[name].shape), spec, kind == "input"):
                problems.append(f"{kind} {name} has shape {actual[name].shape} in the file, not compatible with "
                                f"{spec.shape} in the manifest")
    if problems:
        raise StartupError(f"{setting}: the file does not fit stage {stage.name}: " + "; ".join(problems))


def load_stage(settings: StageSettings) -> StageRuntime:
    """Every start-up check, then the session. Raises StartupError naming the setting at fault."""
    place = locate_stage(settings)
    providers = resolve_providers(settings.providers)
    # the options the splitter measured the stage's cost with, but for working memory (`serving_options`) and
    # prepacking: off by default where the weights are memory-mapped external data, so they are never copied
    # (BENCHMARKS.md, memory)
    prepack = settings.prepack if settings.prepack is not None else not (
        settings.file is None and place.stage.data_file is not None)
    options = serving_options(settings.threads, prepack=prepack)
    if settings.max_batch_size > 1:
        fixed = [t.name for t in place.stage.inputs if not t.shape or t.shape[0] != -1]
        if fixed:
            raise StartupError(f"STAGE_MAX_BATCH_SIZE: inputs {fixed} have no dynamic batch dimension to batch on")
    setting = "STAGE_FILE" if settings.file is not None else "STAGE_MANIFEST"
    try:
        session = ort.InferenceSession(str(place.file), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise StartupError(f"{setting}: onnxruntime cannot load {place.file}: {exc}") from None
    check_contract(session, place.stage, setting)
    return StageRuntime(place=place, session=session, threads=settings.threads,
                        max_batch_size=settings.max_batch_size, max_queue_delay_ms=settings.max_queue_delay_ms)


# The longest run (as measured so far, per sample) that the event loop makes itself for a request that is alone in
# the stage. Running it on the thread that has just received the inputs, with no hand-off to the inference thread
# and back, measured 1.5 ms less per request on reference-stage-1 (3.2 MB in, 9 ms of inference: 15.5 -> 14.0 ms
# p50 at concurrency 1) and about 0.07 ms on a stage of 1 KB, on the 2-core machine. With other requests in the
# stage the run goes to the thread, so their I/O overlaps it (throughput at concurrency 4 and 8 unchanged); a run
# this short keeps a request that arrives meanwhile (or a health check) waiting no longer than this.
INLINE_MAX_MS = 20.0
EMA_WEIGHT = 0.2  # of the latest run in the running estimate of milliseconds per sample


def samples_of(tensors: Mapping[str, np.ndarray]) -> int:
    """The samples a run carries: the first input's dimension 0 (1 for a scalar input or none)."""
    first = next(iter(tensors.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


@dataclass
class StageRuntime:
    """One stage's onnxruntime session; inference runs one at a time on its own thread (a lone short run on the
    event loop: `runs_inline`)."""

    place: StagePlace
    session: ort.InferenceSession
    threads: int
    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0
    # Told the samples of every onnxruntime run (the metrics' batch-size histogram); called on the run's thread.
    on_run: Callable[[int], None] | None = None
    _executor: ThreadPoolExecutor = field(init=False)
    batcher: DynamicBatcher | None = field(init=False, default=None)
    # Milliseconds per sample of the runs so far (None before the first reported one) and the runs under way on
    # any thread: together they decide whether a lone request's run may stay on the event loop (`infer`).
    ms_per_sample: float | None = field(init=False, default=None)
    _running: int = field(init=False, default=0)
    _running_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # One worker: each run already uses `threads` intra-op threads; concurrency comes from overlapping I/O.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self._output_names = [t.name for t in self.place.stage.outputs]
        if self.max_batch_size > 1:
            self.batcher = DynamicBatcher(self._run_off_loop, self.max_batch_size, self.max_queue_delay_ms)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def check_inputs(self, tensors: Mapping[str, np.ndarray], model: str | None = None) -> int | None:
        """Raise InvalidInput unless the tensors are exactly the stage's inputs, by name, datatype and shape,
        and those with a dynamic batch dimension (0) agree on it; return that batch size (None: no such input)."""
        specs = self.place.stage.inputs
        model = model or self.place.stage.name  # as the client named it: the pipeline, at the first stage
        expected = [s.name for s in specs]
        for name in tensors:
            if name not in expected:
                raise InvalidInput(f"tensor {name}: not an input of {model}; expected {expected}")
        for spec in specs:
            array = tensors.get(spec.name)
            if array is None:
                raise InvalidInput(f"tensor {spec.name}: missing; {model} expects inputs {expected}")
            if array.dtype.name != DATATYPE_TO_NUMPY[spec.datatype]:
                got = next((k for k, v in DATATYPE_TO_NUMPY.items() if v == array.dtype.name), array.dtype.name)
                raise InvalidInput(f"tensor {spec.name}: expected datatype {spec.datatype}, got {got}")
            shape = array.shape
            if len(shape) != len(spec.shape) or any(d != -1 and d != s for d, s in zip(spec.shape, shape,
                                                                                       strict=True)):
                raise InvalidInput(f"tensor {spec.name}: expected shape {spec.shape} (-1 is any), got {list(shape)}")
        batches = {s.name: int(tensors[s.name].shape[0]) for s in specs if s.shape and s.shape[0] == -1}
        if len(set(batches.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size (dimension 0): {batches}; every input must "
                               "carry the same samples")
        return next(iter(batches.values()), None)

    def run(self, tensors: Mapping[str, np.ndarray], report: bool = True) -> tuple[dict[str, np.ndarray], float]:
        """Blocking inference: the outputs by name and the milliseconds onnxruntime took; `report` tells
        `on_run` the run's samples (not for the warm-up)."""
        with self._running_lock:
            self._running += 1
        start = time.perf_counter()
        try:
            results = self.session.run(self._output_names, dict(tensors))
        except Exception as exc:
            name = type(exc).__name__
            if name in {"InvalidArgument", "InvalidGraph"}:
                raise InvalidInput(f"onnxruntime rejected the inputs of {self.place.stage.name}: {exc}") from None
            raise InferenceFailed(f"inference failed in {self.place.stage.name}: {name}: {exc}") from None
        finally:
            with self._running_lock:
                self._running -= 1
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if report:
            samples = samples_of(tensors)
            latest = elapsed_ms / max(samples, 1)
            last = self.ms_per_sample
            self.ms_per_sample = latest if last is None else (1 - EMA_WEIGHT) * last + EMA_WEIGHT * latest
            if self.on_run is not None:
                self.on_run(samples)
        return dict(zip(self._output_names, results, strict=True)), elapsed_ms

    def runs_inline(self, tensors: Mapping[str, np.ndarray]) -> bool:
        """Whether a lone request's run stays on the event loop: no run under way, no batcher, and runs of its
        size measured at most INLINE_MAX_MS (never before the first measured run)."""
        estimate = self.ms_per_sample
        return (self.batcher is None and estimate is not None and self._running == 0
                and estimate * max(samples_of(tensors), 1) <= INLINE_MAX_MS)

    async def _run_off_loop(self, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run, tensors)

    async def infer(self, tensors: Mapping[str, np.ndarray],
                    alone: bool = False) -> tuple[dict[str, np.ndarray], float]:
        """Run inputs that passed `check_inputs` on the inference thread (alone, or merged with others by the
        batcher), so the event loop keeps answering; a short run of a request `alone` in the stage on the event
        loop itself (`runs_inline`), which saves the hand-off and delays no one."""
        if self.batcher is not None:
            return await self.batcher.submit(tensors)
        if alone and self.runs_inline(tensors):
            return self.run(tensors)
        return await self._run_off_loop(dict(tensors))

    async def warm_up(self) -> float:
        """One run on zeros (dynamic dimensions as 1), on the inference thread; returns its milliseconds."""
        feed = {
            s.name: np.zeros([1 if d == -1 else d for d in s.shape], dtype=DATATYPE_TO_NUMPY[s.datatype])
            for s in self.place.stage.inputs
        }
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self._executor, self.run, feed, False))[1]

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self._executor.shutdown(wait=True)
