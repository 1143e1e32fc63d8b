"""What one stage admits: requests in flight (`Admission`), bytes of bodies held (`BodyBudget`) and samples per
request (`BatchLimit`).

The batch bound comes from the manifest: every stage's input tensors are known per sample, so the first
stage can tell, before any work, that a batch would grow at some later stage into a request body over
STAGE_MAX_REQUEST_BYTES (each stage is assumed to run with the same limit), and refuse it (413) instead of
running it and getting the later stage's 413 back. Dimensions other than the batch that are dynamic count
as 1, so for such stages the bound is a lower one and that stage's own limit still applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from model_export.manifest import Stage, TensorSpec
from stage_service.errors import Overloaded, PayloadTooLarge

# Room left in a request body for the JSON header of the binary extension (names, shapes, parameters).
HEADER_ALLOWANCE = 4096


class Admission:
    """At most `limit` inference requests in flight; past it, Overloaded (503) at once, never a queue."""

    def __init__(self, stage: str, limit: int) -> None:
        self.stage = stage
        self.limit = limit
        self.inflight = 0

    def __enter__(self) -> None:
        if self.inflight >= self.limit:
            raise Overloaded(f"stage {self.stage} has {self.inflight} requests in flight "
                             f"(STAGE_MAX_INFLIGHT={self.limit}); try again")
        self.inflight += 1

    def __exit__(self, *_: object) -> None:
        self.inflight -= 1


class BodyBudget:
    """Bytes of request bodies held in memory at once, from their first byte to their answer; past `limit`,
    Overloaded (503) at once. Bodies are read before an inference slot is taken, so this is what bounds the
    memory that many slow or large uploads can take."""

    def __init__(self, stage: str, limit: int) -> None:
        self.stage = stage
        self.limit = limit
        self.used = 0

    @contextmanager
    def account(self) -> Iterator[Held]:
        """What one request holds: `take(n)` more bytes, `take.give_back(n)` of them early; the rest is given
        back on exit."""
        held = Held(self)
        try:
            yield held
        finally:
            self.release(held.size)

    def reserve(self, size: int) -> bool:
        """Hold `size` bytes for a body read before the app takes it (`release` gives them back); False past the
        limit, leaving the refusal to the app."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


class Held:
    """The bytes of one request's body taken from a BodyBudget (`BodyBudget.account`)."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def __call__(self, size: int) -> None:
        """Take `size` more bytes; Overloaded past the budget's limit."""
        budget = self.budget
        if not budget.reserve(size):
            raise Overloaded(f"stage {budget.stage} holds {budget.used} bytes of request bodies "
                             f"(STAGE_MAX_BUFFERED_BYTES={budget.limit}); try again")
        self.size += size

    def give_back(self, size: int) -> None:
        """Let go of `size` of the bytes taken (no more than were) before the request ends."""
        size = min(size, self.size)
        self.budget.release(size)
        self.size -= size


def sample_bytes(tensors: list[TensorSpec]) -> int | None:
    """Bytes of one sample of these tensors (dynamic non-batch dims as 1); None unless all are batched."""
    if not tensors or any(not t.shape or t.shape[0] != -1 for t in tensors):
        return None
    return sum(t.bytes_per_sample() for t in tensors)


@dataclass(frozen=True)
class BatchLimit:
    """The most samples one request may carry here, and why (for the 413's message); None: no bound."""

    samples: int | None
    reason: str = ""

    @classmethod
    def for_stages(cls, stages: list[Stage], max_request_bytes: int, max_request_batch: int | None) -> BatchLimit:
        """The bound for a request entering the first of `stages` (this stage and every later one)."""
        best = cls(None)
        if max_request_batch is not None:
            best = cls(max_request_batch, f"STAGE_MAX_REQUEST_BATCH={max_request_batch}")
        room = max(max_request_bytes - HEADER_ALLOWANCE, 1)
        for stage in stages:
            per_sample = sample_bytes(stage.inputs)
            if not per_sample:
                continue
            samples = max(room // per_sample, 1)
            if best.samples is None or samples < best.samples:
                best = cls(samples, f"stage {stage.name} takes {per_sample} bytes a sample and accepts request "
                                    f"bodies up to STAGE_MAX_REQUEST_BYTES={max_request_bytes}")
        return best

    def check(self, batch: int | None) -> None:
        if batch is not None and self.samples is not None and batch > self.samples:
            raise PayloadTooLarge(f"a batch of {batch} samples is more than this pipeline takes in one request "
                                  f"({self.reason}); send at most {self.samples} samples a request")
