"""A wrong `mesh.yaml` is reported as one line per problem: file:line, the field's path, what is wrong, and
for an unknown key the field it most likely meant; never pydantic's own text. And the repository's
`mesh.yaml` fits any pipeline: no stage names in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.plan import resolve
from mesh.policy import PolicyError, load_policy
from mesh.policy_errors import did_you_mean, dotted, key_lines
from tests.mesh.local_mesh import REPO
from tests.tiny import write_tiny_pipeline

BAD = """\
namespace: pipeline
defaults:
  replica: 2
  retries:
    attemps: 3
  threads: 0
stages:
  reference-stage-3:
    versions:
      - name: v1
        weight: 90
      - name: v2
        weight: 20
gateway:
  port: 99999
tracing: {sampling_percent: 200}
"""


def problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return str(caught.value).splitlines()


def test_one_line_per_problem_with_file_line_path_and_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    assert problems(BAD, tmp_path) == [
        f"{path}:3: defaults.replica: unknown field; did you mean 'replicas'?",
        f"{path}:5: defaults.retries.attemps: unknown field; did you mean 'attempts'?",
        f"{path}:6: defaults.threads: input should be greater than or equal to 1 (got 0)",
        f"{path}:9: stages.reference-stage-3.versions: version weights must sum to 100, got 110 (['v1', 'v2'])",
        f"{path}:15: gateway.port: input should be less than or equal to 65535 (got 99999)",
        f"{path}:16: tracing.sampling_percent: input should be less than or equal to 100 (got 200)",
    ]


def test_no_pydantic_or_yaml_internals(tmp_path: Path) -> None:
    for text in (BAD, "gateway:\n  port: [1\n", "defaults:\n  timeout_s: soon\n", "stages:\n  a: {versions: []}\n"):
        lines = problems(text, tmp_path)
        joined = "\n".join(lines)
        assert "errors.pydantic.dev" not in joined and "input_value" not in joined and "Traceback" not in joined
        assert all(line.startswith(str(tmp_path / "mesh.yaml")) for line in lines), lines
    assert problems("gateway:\n  port: [1\n", tmp_path) == [
        f"{tmp_path / 'mesh.yaml'}:3: not valid YAML: expected ',' or ']', but got '<stream end>'"]
    assert problems("stages:\n  a: {versions: []}\n", tmp_path) == [
        f"{tmp_path / 'mesh.yaml'}:2: stages.a.versions: versions must list at least one version"]


def test_unknown_top_level_key_lists_the_known_ones(tmp_path: Path) -> None:
    assert problems("namespace: a\nrouting: {}\n", tmp_path) == [
        f"{tmp_path / 'mesh.yaml'}:2: routing: unknown field; expected one of: clients, defaults, gateway, namespace, "
        "splits, stages, tracing"]


def test_helpers() -> None:
    assert did_you_mean("replica", ["replicas", "threads"]) == "; did you mean 'replicas'?"
    assert dotted(("stages", "s", "versions", 1, "weight")) == "stages.s.versions[1].weight"
    assert key_lines("a:\n  b:\n    - x\n    - y\n") == {("a",): 1, ("a", "b"): 2, ("a", "b", 0): 3, ("a", "b", 1): 4}


@pytest.mark.parametrize("stages", [1, 2, 5])
def test_the_repository_policy_fits_any_pipeline(tmp_path: Path, stages: int) -> None:
    manifest = write_tiny_pipeline(tmp_path / "any", name="any", widths=tuple(range(4, 4 + stages + 1)))
    plan = resolve(load_policy(REPO / "mesh.yaml"), manifest)
    assert [s.name for s in plan.stages] == [f"any-stage-{i}" for i in range(stages)]
    timeouts = [h.route.timeout_s for h in plan.hops]
    assert timeouts == sorted(timeouts, reverse=True) and len(set(timeouts)) == stages  # shrinking along the chain


def test_bad_gateway_auth_and_tls_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    text = """\
gateway:
  auth:
    enabled: maybe
    issuer: ""
    audiences: []
    jwks_uri: keys.example.com/jwks
    jwks: '{"no": "keys"}'
    audience: x
  tls:
    credential_name: Not_A_Secret
"""
    found = problems(text, tmp_path)
    assert found == [
        f"{path}:3: gateway.auth.enabled: input should be a valid boolean, unable to interpret input (got 'maybe')",
        f"{path}:4: gateway.auth.issuer: string should have at least 1 character (got '')",
        f"{path}:5: gateway.auth.audiences: audiences must list at least one non-empty audience, got []",
        f"{path}:6: gateway.auth.jwks_uri: 'keys.example.com/jwks' is not an http(s) URL such as "
        "https://issuer.example/.well-known/jwks.json",
        f"{path}:7: gateway.auth.jwks: jwks must be a JSON Web Key Set: {{\"keys\": [...]}} with at least one key",
        f"{path}:8: gateway.auth.audience: unknown field; did you mean 'audiences'?",
        f"{path}:10: gateway.tls.credential_name: " + found[-1].split("credential_name: ", 1)[1],
    ]
    assert "Not_A_Secret" in found[-1]
    both = problems("gateway:\n  auth:\n    jwks_uri: https://a.example/k\n    jwks: '{\"keys\": [{}]}'\n",
                    tmp_path)
    assert both == [f"{path}:2: gateway.auth: set jwks_uri or jwks, not both"]


def test_problems_against_the_pipeline_name_their_lines_too(tmp_path: Path) -> None:
    """What only the pipeline can tell (a stage it lacks, timeouts that grow along its chain) is found by
    `resolve`, after the file parsed: each still comes at the line of the field it is about."""
    manifest = write_tiny_pipeline(tmp_path / "tiny", name="tiny")
    path = tmp_path / "mesh.yaml"
    path.write_text("namespace: pipeline\nstages:\n  tiny-stage-9:\n    replicas: 2\n  tiny-stage-2:\n"
                    "    timeout_s: 60\n")
    with pytest.raises(PolicyError) as info:
        resolve(load_policy(path), manifest)
    assert str(info.value).splitlines() == [
        f"{path}:3: stages.tiny-stage-9: unknown stage; the pipeline 'tiny' has ['tiny-stage-0', 'tiny-stage-1', "
        "'tiny-stage-2']",
        f"{path}:6: stages.tiny-stage-2.timeout_s: timeouts must shrink along the chain: tiny-stage-1 has 10.0s but "
        "the later tiny-stage-2 has 60.0s; an outer hop's timeout must cover the hops inside it",
    ]
