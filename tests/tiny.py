"""The tiny pipelines now live in `model_export.tiny` (benchmarks build them too, and never import tests/)."""

from model_export.tiny import dense_stage_graph, write_tiny_pipeline

__all__ = ["dense_stage_graph", "write_tiny_pipeline"]
