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


def create_session(model: str | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session, as the splitter measures and verifies (the stage service picks its own providers)."""
    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
