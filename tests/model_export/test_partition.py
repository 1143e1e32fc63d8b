"""The cut chooser against exhaustive search, on many random cost profiles."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

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


def test_a_stage_the_summed_segments_made_for_nothing_is_merged_and_its_cut_put_where_it_pays() -> None:
    """The reference model in 4 stages: block 1 | block 2's convolution | block 2's pooling | block 3 and the head.
    The pooling timed alone pays its layout conversions (3.6 ms) and costs nothing inside block 2's stage; a stage
    also pays 0.3 ms per MB across its cuts (3.2, 6.4, 1.6 and 0.001 MB after each segment). No single cut move
    gains anything; taking out the cut after the convolution and cutting block 3 from the head does."""
    costs, mb = [9.0, 41.0, 0.0, 39.5, 0.05], [3.2, 6.4, 1.6, 0.001]

    def timed(a: int, b: int) -> float:
        alone = 3.6 if (a, b) == (2, 3) else 0.0
        crossing = (mb[a - 1] if a > 0 else 0.0) + (mb[b - 1] if b < len(costs) else 0.0)
        return sum(costs[a:b]) + alone + 0.3 * crossing

    assert refine_with_stage_times([0, 1, 2], 5, timed, cut_bytes=[int(x * 1e6) for x in mb],
                                   per_byte=0.3e-6) == [0, 2, 3]
    assert refine_with_stage_times([0, 1, 2], 5, timed) == [0, 1, 2]  # bytes unknown: nothing moves between stages


def test_at_the_same_bottleneck_a_cut_moves_to_where_fewer_bytes_cross() -> None:
    """Block 1's convolution cut from its pooling (12.8 MB across) costs the bottleneck nothing, block 2's stage being
    the slowest either way; with the bytes known, that cut goes where 1 KB crosses (between block 3 and the head)."""
    costs, mb = [1.0, 8.0, 41.0, 39.5, 0.05], [12.8, 3.2, 1.6, 0.001]
    picked = [0, 1, 2]  # block 1's convolution | its pooling | block 2 | block 3 and the head
    timed = _span_time(costs)
    assert refine_with_stage_times(picked, 5, timed) == picked  # by time alone, no move gains
    in_bytes = [int(x * 1e6) for x in mb]
    assert refine_with_stage_times(picked, 5, timed, cut_bytes=in_bytes, per_byte=0.3e-6) == [1, 2, 3]
    # bytes worth less than the 2% the bottleneck may grow (0.8 ms of 41): timing noise would decide, so no move
    assert refine_with_stage_times(picked, 5, timed, cut_bytes=in_bytes, per_byte=0.01e-6) == picked


def test_a_cut_moves_to_the_fewest_bytes_in_a_stage_however_far_from_its_even_point() -> None:
    """The reference model's 14 segments in 4 stages, as the summed segments pick them (block 1 | block 2's
    convolution | its ReLU and pooling | block 3 and the head: 11.2 MB across). The 1 KB between block 3's pooled mean
    and the head lies four segments past block 3's convolution, the even point of block 3 and the head; the cut goes
    there (4.8 MB), not to the input's transpose (0.6 MB, 5.4 MB in all) that lies near an even point."""
    costs = [0.2, 8.7, 0.0, 0.0, 41.0, 0.0, 0.0, 41.3, 0.0, 0.0, 0.3, 0.05, 0.12, 0.06]
    mb = [0.6, 12.8, 12.8, 3.2, 6.4, 6.4, 1.6, 3.2, 3.2, 0.8, 0.001, 0.001, 0.004]
    fused = {2, 3, 5, 6, 8, 9}  # ReLU and pooling: free beside their convolution, 1.8 ms each in a stage without it

    def timed(a: int, b: int) -> float:
        alone = 1.8 * len(fused & set(range(a, b))) if set(range(a, b)) <= fused else 0.0
        crossing = (mb[a - 1] if a > 0 else 0.0) + (mb[b - 1] if b < len(costs) else 0.0)
        return sum(costs[a:b]) + alone + 0.3 * crossing

    assert refine_with_stage_times([3, 4, 6], 14, timed, cut_bytes=[int(x * 1e6) for x in mb],
                                   per_byte=0.3e-6) == [3, 6, 10]


def test_the_timing_passes_run_to_their_total_when_the_cuts_settle_early() -> None:
    """The progress bar of `split` stood at 0/3 when no cut moved: the loop left its iterator unfinished."""
    seen: list[int] = []

    def track(items: Iterable[int], _: str) -> Iterator[int]:
        for item in items:
            yield item
            seen.append(item)

    assert refine_with_stage_times([0, 2], 5, _span_time([10.0, 1.0, 1.0, 3.0, 1.0]), track=track) == [0, 2]
    assert seen == [0, 1, 2]
