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


def available_providers(requested: list[str] | None = None) -> list[str]:
    """The requested providers that this onnxruntime build has, CUDA first when present; CPU always last."""
    have = ort.get_available_providers()
    wanted = requested or ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in wanted if p in have and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def create_session(model: str | bytes, threads: int = 1, providers: list[str] | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(threads), providers=available_providers(providers))
