"""The cut chooser against exhaustive search, on many random cost profiles."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from model_export.partition import best_bottleneck, choose_cuts, exhaustive, stage_costs
from model_export.split import refine_with_stage_times


@pytest.mark.parametrize("seed", range(20))
def test_dynamic_programming_matches_exhaustive_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 10))
    costs = list(rng.random(n) * 10)
    cut_bytes = [int(b) for b in rng.integers(1, 1000, n - 1)]
    for stages in range(1, n + 1):
        cost = stage_costs(costs, cut_bytes, 0.001)
        best, _ = exhaustive(n, stages, cost)
        assert best_bottleneck(n, stages, cost) == pytest.approx(best)
        cuts = choose_cuts(costs, cut_bytes, stages, slack=0.0, transfer_per_byte=0.001)
        assert len(cuts) == stages - 1 == len(set(cuts))
        bounds = [0, *[c + 1 for c in cuts], n]
        assert max(cost(a, b) for a, b in zip(bounds, bounds[1:], strict=False)) == pytest.approx(best)


def test_ties_go_to_fewer_bytes_crossing() -> None:
    costs = [1.0, 5.0, 5.0, 1.0, 1.0, 1.0]
    # cutting after segment 3 or after segment 4 gives the same bottleneck; cut 4 sends less
    assert choose_cuts(costs, [10, 1, 10, 10, 1], 5) == [0, 1, 2, 4]
    assert choose_cuts(costs, [10, 1, 10, 1, 10], 5) == [0, 1, 2, 3]


def test_transfer_cost_steers_away_from_large_activations() -> None:
    costs = [1.0, 1.0, 1.0]
    assert choose_cuts(costs, [1, 1000], 2) == [0]  # equal compute either way: fewer bytes
    assert choose_cuts([1.0, 1.05, 1.0], [1, 10_000], 2, slack=0.0, transfer_per_byte=0.001) == [0]


def test_bad_stage_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot make 4 stages from 3 segments"):
        choose_cuts([1.0, 1.0, 1.0], [1, 1], 4)


def _span_time(costs: list[float]) -> Callable[[int, int], float]:
    return lambda a, b: float(sum(costs[a:b]))


def test_stage_times_move_a_cut_the_summed_segments_misplaced() -> None:
    """Eight equal segments whose summed times (each paying a run's overhead) put the cut after segment 1:
    timed as stages, the even point is after segment 3."""
    assert refine_with_stage_times([1], 8, _span_time([1.0] * 8)) == [3]


def test_only_a_cut_beside_the_slowest_stage_moves() -> None:
    # stages [0], [1..3] (holding the heavy segment 3), [4..5]: the first cut moves to leave segment 3 alone
    assert refine_with_stage_times([0, 3], 6, _span_time([1.0, 1.0, 1.0, 10.0, 1.0, 1.0])) == [2, 3]
    # the slowest stage is one segment of its own: no cut moves, whatever the others weigh
    assert refine_with_stage_times([0, 2], 5, _span_time([10.0, 1.0, 1.0, 3.0, 1.0])) == [0, 2]
    # a gain within the slack (2%: 1.02 -> 1.015 ms here) is noise: the cut the bytes chose stays
    assert refine_with_stage_times([0], 3, _span_time([0.995, 0.02, 1.0])) == [0]
    assert refine_with_stage_times([0], 3, _span_time([0.5, 0.2, 1.0])) == [1]  # a real gain moves it
