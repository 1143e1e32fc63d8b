"""Choosing cuts: minimise the slowest stage, then the bytes crossing the cuts.

Segments are the pieces between adjacent clean cuts; a stage is a run of consecutive segments. A
stage costs its segments plus the time to receive and send the activations at its two cuts
(`transfer_per_byte`, so that, all else equal, small activations win). Phase one finds the smallest
achievable bottleneck (the cost of the most expensive stage) by dynamic programming; phase two, among
partitions whose bottleneck is within `slack` of it (measurement noise makes finer distinctions
meaningless), picks the one sending the fewest bytes across its cuts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence


def moved_bytes(cut_bytes: Sequence[int], i: int, j: int) -> int:
    """The bytes the stage of segments i..j-1 receives and sends at its cuts (cut k follows segment k)."""
    return (cut_bytes[i - 1] if i > 0 else 0) + (cut_bytes[j - 1] if j <= len(cut_bytes) else 0)


def stage_costs(costs: Sequence[float], cut_bytes: Sequence[int],
                transfer_per_byte: float) -> Callable[[int, int], float]:
    """cost(i, j) of the stage made of segments i..j-1, including its boundary transfers."""
    prefix = [0.0, *itertools.accumulate(costs)]

    def cost(i: int, j: int) -> float:
        return prefix[j] - prefix[i] + transfer_per_byte * moved_bytes(cut_bytes, i, j)

    return cost


def best_bottleneck(n: int, stages: int, cost: Callable[[int, int], float]) -> float:
    inf = math.inf
    # f[k][j]: least bottleneck splitting the first j segments into k stages
    f = [[inf] * (n + 1) for _ in range(stages + 1)]
    f[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            f[k][j] = min(max(f[k - 1][i], cost(i, j)) for i in range(k - 1, j))
    return f[stages][n]


def choose_cuts(costs: Sequence[float], cut_bytes: Sequence[int], stages: int, slack: float = 0.02,
                transfer_per_byte: float = 0.0) -> list[int]:
    """Indices into `cut_bytes` (cut i lies after segment i) of the stages-1 cuts chosen."""
    n = len(costs)
    if len(cut_bytes) != n - 1:
        raise ValueError("need exactly one cut between each pair of adjacent segments")
    if not 1 <= stages <= n:
        raise ValueError(f"cannot make {stages} stages from {n} segments")
    cost = stage_costs(costs, cut_bytes, transfer_per_byte)
    limit = best_bottleneck(n, stages, cost) * (1 + slack) + 1e-12
    inf = math.inf
    # g[k][j]: fewest bytes crossing when the first j segments form k stages each within the limit
    g = [[inf] * (n + 1) for _ in range(stages + 1)]
    back = [[-1] * (n + 1) for _ in range(stages + 1)]
    g[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                if g[k - 1][i] == inf or cost(i, j) > limit:
                    continue
                crossing = g[k - 1][i] + (cut_bytes[j - 1] if j < n else 0)
                if crossing < g[k][j]:
                    g[k][j], back[k][j] = crossing, i
    cuts, j = [], n
    for k in range(stages, 0, -1):
        i = back[k][j]
        if i > 0:
            cuts.append(i - 1)
        j = i
    return sorted(cuts)


def exhaustive(n_segments: int, stages: int, stage_cost: Callable[[int, int], float]) -> tuple[float, list[int]]:
    """Best bottleneck over every choice of stages-1 cuts, with `stage_cost(first, last_exclusive)`."""
    best: tuple[float, list[int]] = (math.inf, [])
    for cuts in itertools.combinations(range(n_segments - 1), stages - 1):
        bounds = [0, *[c + 1 for c in cuts], n_segments]
        bottleneck = max(stage_cost(a, b) for a, b in itertools.pairwise(bounds))
        if bottleneck < best[0]:
            best = (bottleneck, list(cuts))
    return best
