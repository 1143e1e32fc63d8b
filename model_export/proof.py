"""The one rule every equivalence check follows (`export` against Keras, `split`, `verify`, `merge`).

Two computations agree on a tensor when every element satisfies |got - expected| <= atol + rtol * |expected|
(numpy's `allclose`), so that 0-255 inputs and logits in the thousands are judged as fairly as values
near zero. A proof also says when the expected outputs are the same for every input: equality then
proves little, and the user should know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model_export.errors import ExportError


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def __str__(self) -> str:
        return f"|diff| <= {self.atol:g} + {self.rtol:g} * |expected|"


# Keras and onnxruntime run different kernels; the stages and the whole model run the same ones.
EXPORT_TOLERANCE = Tolerance(rtol=1e-3, atol=1e-4)
CHAIN_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)


def _clipped(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a space where it has one, marked "...": a cut mid-word turned
    idx=999 into idx=99."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]  # one more: a space right after the limit keeps the word before it
    return (head.rsplit(" ", 1)[0] if " " in head else text[:limit]) + " ..."


@dataclass
class Proof:
    """What one check compared, its worst element, and which outputs were constant."""

    tolerance: Tolerance
    cases: int = 0
    skipped: list[str] = field(default_factory=list)  # cases the reference itself cannot run (e.g. too short)
    tensors: set[str] = field(default_factory=set)
    max_abs_diff: float = 0.0
    worst_ratio: float = 0.0  # max |diff| / (atol + rtol * |expected|); above 1 fails
    worst: str = ""
    _first_rows: dict[str, np.ndarray] = field(default_factory=dict)
    _varies: set[str] = field(default_factory=set)

    def skip(self, case: str, reason: str) -> None:
        """The reference cannot run this case: the model does not take such inputs, so it proves nothing."""
        self.skipped.append(f"{case}: {_clipped(reason.splitlines()[0], 300)}")
        if len(self.skipped) == self.cases:
            raise ExportError(f"the model runs on none of the {self.cases} input cases; the first failed with "
                              f"{self.skipped[0]}; give inputs it takes with --samples FILE.npz")

    def compare(self, name: str, expected: np.ndarray, got: np.ndarray, case: str) -> None:
        """Judge one tensor of one case; a shape or dtype-kind mismatch is a failure at once."""
        self.tensors.add(name)
        if got.shape != expected.shape:
            raise ExportError(f"{name} ({case}): shape {list(got.shape)} differs from the expected "
                              f"{list(expected.shape)}")
        e, g = expected.astype(np.float64), got.astype(np.float64)
        if not (np.isfinite(e) == np.isfinite(g)).all():
            raise ExportError(f"{name} ({case}): non-finite values (NaN or inf) where the other side has numbers")
        if not e.size:
            return
        finite = np.isfinite(e)
        diff = np.where(finite, np.abs(g - e), 0.0)
        allowed = self.tolerance.atol + self.tolerance.rtol * np.abs(np.where(finite, e, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(allowed > 0, diff / allowed, np.where(diff > allowed, math.inf, 0.0))
        if float(ratio.max()) >= self.worst_ratio:
            self.worst_ratio, self.worst = float(ratio.max()), f"{name} ({case})"
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))

    def observe_output(self, name: str, expected: np.ndarray) -> None:
        """Track whether an output varies at all across the inputs seen."""
        if expected.ndim == 0 or expected.shape[0] == 0:
            return
        rows = expected.reshape(expected.shape[0], -1).astype(np.float64)
        first = self._first_rows.setdefault(name, rows[0])
        if first.shape != rows.shape[1:] or np.abs(rows - first).max() > self.tolerance.atol:
            self._varies.add(name)

    @property
    def degenerate(self) -> list[str]:
        return sorted(set(self._first_rows) - self._varies)

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1.0

    def summary(self) -> str:
        run = self.cases - len(self.skipped)
        text = (f"{len(self.tensors)} tensor(s) over {run} input case(s): max |diff| = "
                f"{self.max_abs_diff:.3g}, worst at {self.worst_ratio:.3g} of the tolerance ({self.tolerance})")
        if self.skipped:
            text += f"; {len(self.skipped)} case(s) the model itself does not take were left out"
        if self.degenerate:
            text += (f"; warning: output(s) {self.degenerate} are the same for every input, so equality proves "
                     "little about them")
        return text

    def check(self, what: str) -> Proof:
        """Raise ExportError naming the worst tensor when any element is outside the tolerance."""
        if not self.passed:
            raise ExportError(
                f"{what}: {self.worst} is off by up to {self.worst_ratio:.3g} times the tolerance "
                f"({self.tolerance}; max |diff| = {self.max_abs_diff:.3g} over {self.cases} input cases)"
            )
        return self
