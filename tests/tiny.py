"""The tiny pipelines now live in `model_export.tiny` (benchmarks build them too, and never import tests/)."""

from model_export.tiny import IR_VERSION, OPSET, dense_stage_graph, write_tiny_pipeline

__all__ = ["IR_VERSION", "OPSET", "dense_stage_graph", "write_tiny_pipeline"]
