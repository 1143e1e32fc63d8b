"""The serving session options (`serving_options`): the same results as the splitter's options, with the
process's shared arena registered once however many sessions use it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from benchmarks.large_model import large_model
from model_export.ort_session import create_session, serving_options


def test_serving_sessions_share_one_arena_and_agree_with_the_splitters_sessions() -> None:
    model = large_model(hidden_layers=1, hidden_width=64, classes=10, size=32).SerializeToString()
    x = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    want = create_session(model).run(None, {"image": x})[0]
    for _ in range(2):  # a second registration of the arena would raise
        options = serving_options(1)
        assert not options.enable_mem_pattern
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for batch in (x, x[:1]):  # shapes change between runs: no pre-planned block to rely on
            np.testing.assert_array_equal(session.run(None, {"image": batch})[0], want[: len(batch)])
