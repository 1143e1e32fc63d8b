"""onnxruntime session settings shared by the splitter's cost model and the stage service.

Several stage sessions share one machine, so each gets an explicit intra-op thread count instead of a
thread pool as wide as the machine (they would fight for cores).
"""

from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int, prepack: bool = True) -> ort.SessionOptions:
    """`prepack` False: weights are used as stored, never repacked into a copy for the matrix kernels; with
    memory-mapped external data that keeps them in the (shared) mapped file rather than in a private copy,
    and there is no load-time spike of the original and the packed copy side by side."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


_shared_arena_registered = False


def _register_shared_arena() -> None:
    """One CPU arena for the process that grows by what is asked for, not to the next power of two (its
    default: a 17 MB block of activations took a 32 MB chunk). Registered once per process."""
    global _shared_arena_registered
    if not _shared_arena_registered:
        arena = ort.OrtArenaCfg({"arena_extend_strategy": 1})  # 1: kSameAsRequested
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu, arena)
        _shared_arena_registered = True


def serving_options(threads: int, prepack: bool = True) -> ort.SessionOptions:
    """`session_options` for a long-lived serving session, with its working memory held to what a run needs:
    no memory pattern (one pre-planned block per input shape) and the process's shared arena that grows by
    exactly what is asked. Together 13 MB less on a stage of 224x224 convolutions (31 -> 18 MB), at the same
    speed (BENCHMARKS.md, memory); apart, neither saves anything."""
    options = session_options(threads, prepack)
    options.enable_mem_pattern = False
    _register_shared_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def create_session(model: str | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session, as the splitter measures and verifies (the stage service picks its own providers).
    Silent but for fatal errors: a run on inputs the model does not take raises, and the proof says so in its
    own words (onnxruntime's own log line, printed besides, looked like a failure of a split that passed)."""
    options = session_options(threads)
    options.log_severity_level = 4
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
