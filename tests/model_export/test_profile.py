"""Stage times read at one speed of the machine (`profile.Metronome`): a shared machine runs in phases of
different speeds, so two stages timed a second apart used to compare as the phases fell, and the same split of the
same model chose different cuts from run to run (four runs, four choices, on the 2-core VM of 2026-11-27)."""

from __future__ import annotations

import numpy as np
import pytest

from model_export.profile import Metronome, calibrated_ms, metronome, time_model
from tests.model_export import graphs


def test_a_run_timed_in_a_slow_phase_reads_the_same_as_in_a_fast_one() -> None:
    fast = calibrated_ms([10.0, 10.2, 9.9], [0.50, 0.51, 0.50], reference_ms=0.5)
    slow = calibrated_ms([18.0, 18.4, 17.8], [0.90, 0.92, 0.89], reference_ms=0.5)
    assert fast == pytest.approx(10.0, rel=0.01) and slow == pytest.approx(fast, rel=0.01)


def test_a_phase_change_within_the_runs_is_read_run_by_run() -> None:
    # the phase changes after the second run: each run against its own beat, not the runs' median against the beats'
    assert calibrated_ms([10.0, 10.0, 20.0, 20.0, 20.0], [0.5, 0.5, 1.0, 1.0, 1.0], 0.5) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        calibrated_ms([10.0, 10.0], [0.5], 0.5)  # a run without its beat is a bug, not a time


def test_the_metronome_is_a_real_onnxruntime_workload_made_once_per_thread_count() -> None:
    beats = metronome(1)
    assert metronome(1) is beats and isinstance(beats, Metronome)
    assert beats.reference_ms > 0 and beats.beat() > 0
    assert beats.session.run(None, beats.feeds)[0].shape == (Metronome.ROWS, Metronome.WIDTH)


def test_time_model_gives_milliseconds_of_a_real_run() -> None:
    model = graphs.residual()
    feeds = {model.graph.input[0].name: np.ones((1, 8), np.float32)}
    ms = time_model(model, feeds, threads=1, runs=5)
    assert 0 < ms < 1000
