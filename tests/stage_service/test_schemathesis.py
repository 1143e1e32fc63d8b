"""schemathesis against the stage's own OpenAPI document (issue 14, item 7): every route, requests generated
from the schema (positive and negative), sent to a real 3-process chain; no answer may be a server error.

The document is the app's (`create_app(...).openapi()`; the stage does not serve it). Only the `name` path
parameter is narrowed, to the names the first stage serves and one it does not, so that generated requests
reach the data plane instead of all ending in 404.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from model_export.manifest import Manifest
from stage_service.app import create_app
from stage_service.runtime import load_stage
from stage_service.settings import StageSettings
from stage_service.tracing import StageTracing
from tests.stage_service.procs import StageProcess, start_chain, stop_all


@pytest.fixture(scope="module")
def served(tiny_pipeline: tuple[Path, Manifest],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[StageProcess]]:
    stages = start_chain(tiny_pipeline[0] / "pipeline.json", log_dir=tmp_path_factory.mktemp("schemathesis"),
                         env={"STAGE_MAX_REQUEST_BYTES": str(1 << 20)})
    yield stages
    assert all(s.alive() for s in stages)
    assert stop_all(stages) == [0, 0, 0], "\n".join(s.log() for s in stages)


@pytest.fixture(scope="module")
def stage_schema(tiny_pipeline: tuple[Path, Manifest]) -> Any:
    settings_ = StageSettings(manifest=tiny_pipeline[0] / "pipeline.json", name="tiny-stage-0",
                              next_url="http://127.0.0.1:1")
    runtime = load_stage(settings_)
    try:
        document = create_app(settings_, runtime, StageTracing.disabled()).openapi()
    finally:
        runtime.close()
    assert "/v2/models/{name}/infer" in document["paths"]
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "name":
                    parameter["schema"] = {"type": "string", "enum": ["tiny", "tiny-stage-0", "other"]}
    return schemathesis.openapi.from_dict(document)


def test_no_server_errors(stage_schema: Any, served: list[StageProcess]) -> None:
    """Each operation in turn, 25 generated cases each (schemathesis' pytest plugin does not run on pytest 9)."""
    operations = [result.ok() for result in stage_schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            response = case.call(base_url=served[0].url, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])

        call()
    codes = [line for line in httpx.get(f"{served[0].url}/metrics").text.splitlines()
             if line.startswith("stage_requests_total")]
    assert any('code="400"' in line for line in codes), codes  # generated bodies reached the data plane
