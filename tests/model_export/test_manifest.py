"""The one DNS-label rule every name in the manifest, the settings and the policy follows."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from model_export.manifest import DnsLabel, PipelineName

LABEL = TypeAdapter(DnsLabel)
PIPELINE = TypeAdapter(PipelineName)


@pytest.mark.parametrize("value", ["a", "v2", "tiny-stage-0", "0abc", "a" * 63])
def test_dns_labels_accepted(value: str) -> None:
    assert LABEL.validate_python(value) == value


@pytest.mark.parametrize("value", ["", "A", "v_2", "-a", "a-", "a.b", "a" * 64, "stage 1"])
def test_dns_labels_refused_with_the_rule(value: str) -> None:
    with pytest.raises(ValidationError, match="is not a DNS label .* at most 63 characters"):
        LABEL.validate_python(value)


def test_pipeline_names_leave_room_for_stage_names() -> None:
    assert PIPELINE.validate_python("a" * 40) == "a" * 40
    with pytest.raises(ValidationError, match="at most 40 characters"):
        PIPELINE.validate_python("a" * 41)
