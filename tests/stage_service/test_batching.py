"""Dynamic batching: merged runs hand every caller exactly its own rows, in unit and in a real chain."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from model_export.manifest import Manifest, load_manifest, write_manifest
from stage_service.batching import DynamicBatcher
from stage_service.errors import StartupError
from stage_service.protocol import HEADER_LENGTH, decode_response, encode_request
from stage_service.runtime import load_stage
from stage_service.settings import StageSettings
from tests.stage_service.procs import start_chain, stop_all


def _doubling(sizes: list[int], fail_on: int | None = None):  # type: ignore[no-untyped-def]
    async def run(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        x = tensors["x"]
        sizes.append(x.shape[0])
        if fail_on is not None and x.shape[0] == fail_on:
            raise RuntimeError("boom")
        await asyncio.sleep(0.01)
        return {"y": x * 2}, 1.0

    return run


def test_concurrent_requests_are_merged_and_split_back() -> None:
    sizes: list[int] = []

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(_doubling(sizes), max_batch_size=4, max_queue_delay_ms=200)
        xs = [np.full((1, 3), i, dtype=np.float32) for i in range(8)]
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        batcher.close()
        return [r[0]["y"] for r in results]

    ys = asyncio.run(main())
    assert sizes == [4, 4]
    for i, y in enumerate(ys):
        np.testing.assert_array_equal(y, np.full((1, 3), 2 * i, dtype=np.float32))


def test_requests_that_cannot_share_a_run_go_separately() -> None:
    sizes: list[int] = []

    async def main() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batcher = DynamicBatcher(_doubling(sizes), max_batch_size=8, max_queue_delay_ms=100)
        a, b, c = await asyncio.gather(
            batcher.submit({"x": np.ones((2, 3), np.float32)}),
            batcher.submit({"x": np.ones((1, 5), np.float32)}),  # other trailing shape
            batcher.submit({"x": np.zeros((3, 3), np.float32)}),
        )
        batcher.close()
        return a[0]["y"], b[0]["y"], c[0]["y"]

    a, b, c = asyncio.run(main())
    assert sorted(sizes) == [1, 5]
    assert a.shape == (2, 3) and b.shape == (1, 5) and c.shape == (3, 3)
    assert a.sum() == 12 and c.sum() == 0


def test_a_failed_run_fails_its_callers_only() -> None:
    sizes: list[int] = []

    async def main() -> tuple[list[object], np.ndarray]:
        batcher = DynamicBatcher(_doubling(sizes, fail_on=2), max_batch_size=2, max_queue_delay_ms=100)
        first = await asyncio.gather(*(batcher.submit({"x": np.ones((1, 1), np.float32)}) for _ in range(2)),
                                     return_exceptions=True)
        later = await batcher.submit({"x": np.ones((1, 1), np.float32)})
        batcher.close()
        return list(first), later[0]["y"]

    first, later = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert later.tolist() == [[2.0]]


def test_a_batching_chain_returns_each_caller_its_own_answer(tiny_pipeline: tuple[Path, Manifest],
                                                              reference: Callable[..., np.ndarray],
                                                              tmp_path: Path) -> None:
    directory, _ = tiny_pipeline
    env = {"STAGE_MAX_BATCH_SIZE": "8", "STAGE_MAX_QUEUE_DELAY_MS": "20"}
    stages = start_chain(directory / "pipeline.json", env=env, log_dir=tmp_path)
    try:
        xs = [np.random.default_rng(i).standard_normal((1 + i % 3, 16)).astype(np.float32) for i in range(24)]

        async def send_all() -> list[np.ndarray]:
            async with httpx.AsyncClient(timeout=30) as client:
                async def one(x: np.ndarray) -> np.ndarray:
                    body, length = encode_request({"x": x})
                    r = await client.post(f"{stages[0].url}/v2/models/tiny/infer", content=body,
                                          headers={HEADER_LENGTH: str(length)})
                    assert r.status_code == 200, r.text
                    return decode_response(r.content, r.headers.get(HEADER_LENGTH))[1]["y"]

                return list(await asyncio.gather(*(one(x) for x in xs)))

        for x, y in zip(xs, asyncio.run(send_all()), strict=True):
            np.testing.assert_allclose(y, reference(x), atol=1e-5)
        metrics = samples(httpx.get(f"{stages[0].url}/metrics").text)
        assert metrics['stage_requests_total{code="200"}'] == 24
        # every sample ran once, in fewer runs than requests: requests were merged (batching off: 24 runs)
        assert metrics["stage_inference_batch_size_sum"] == sum(x.shape[0] for x in xs)
        assert metrics["stage_inference_batch_size_count"] < len(xs)
    finally:
        assert stop_all(stages) == [0, 0, 0]


def samples(text: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_max_batch_size_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="max_batch_size"):
        StageSettings(manifest=Path("x"), name="s", max_batch_size=0)


def test_batching_needs_a_dynamic_batch_dimension(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    """A stage whose input has a fixed batch dimension of 1 cannot merge requests: refused at start-up."""
    directory = tmp_path / "fixed"
    shutil.copytree(tiny_pipeline[0], directory)
    manifest = load_manifest(directory)
    stage = manifest.stages[1]
    fixed = stage.model_copy(update={"inputs": [t.model_copy(update={"shape": [1, 32], "dim_names": None})
                                               for t in stage.inputs]})
    write_manifest(manifest.model_copy(update={"stages": [manifest.stages[0], fixed, manifest.stages[2]]}), directory)
    settings = StageSettings(manifest=directory / "pipeline.json", name=stage.name, next_url="http://127.0.0.1:1",
                             max_batch_size=4)
    with pytest.raises(StartupError, match=r"STAGE_MAX_BATCH_SIZE: inputs \['h1'\] have no dynamic batch dimension"):
        load_stage(settings)
    # the same stage starts without batching, so the refusal was about batching only
    load_stage(settings.model_copy(update={"max_batch_size": 1})).close()
