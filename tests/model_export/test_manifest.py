"""The one DNS-label rule every name in the manifest, the settings and the policy follows; a bad manifest's
one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from model_export.manifest import DnsLabel, ManifestError, PipelineName, load_manifest
from tests.tiny import write_tiny_pipeline

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


def test_a_bad_manifest_is_one_line_naming_the_field_and_the_value(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "tiny", name="tiny")
    path = tmp_path / "tiny" / "pipeline.json"
    data = json.loads(path.read_text())
    data["stages"][1]["inputs"][0]["datatype"] = "FP33"
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "\n" not in message and "errors.pydantic.dev" not in message
    assert "format_version: Input should be 1 (got 99)" in message
    assert "stages.1.inputs.0.datatype: Input should be 'BOOL'" in message and "(got 'FP33')" in message
    data["format_version"] = 1
    data["stages"][1]["inputs"][0]["datatype"] = "FP32"
    data["stages"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"stages: expected at least 1 item\(s\), got 0$"):
        load_manifest(path)
    path.write_text("[]")
    with pytest.raises(ManifestError, match=r"invalid manifest: the document: Input should be a valid dictionary "
                                            r"\(got an array\)$"):
        load_manifest(path)
    with pytest.raises(ManifestError, match=r"not a path to a manifest \(File name too long\)$"):
        load_manifest(tmp_path / ("x" * 300))
