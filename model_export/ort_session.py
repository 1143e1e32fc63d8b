"""onnxruntime session settings shared by the splitter's cost model and the stage service.

Several stage sessions share one machine, so each gets an explicit intra-op thread count instead of a
thread pool as wide as the machine (they would fight for cores).
"""

from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def create_session(model: str | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session, as the splitter measures and verifies (the stage service picks its own providers)."""
    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
