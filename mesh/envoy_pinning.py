"""The routes of split-version pinning in the local mesh's Envoys (mesh.splits): match `x-pipeline-version`.

For one route match (a gateway path, or any path on a sidecar's outbound listener) the routes are, in order:
one per split whose header value it matches exactly, a 400 for any other value (naming the known splits),
and, for a request without the header, the route that assigns it (the gateway: weighted across the splits,
each destination setting the header) or keeps it on the chain it is on (a sidecar: a request that entered
before pinning began, and so carries none).
"""

from __future__ import annotations

import json
from typing import Any

from mesh.splits import HEADER, Assignment

Json = dict[str, Any]


def _exact(value: str) -> Json:
    return {"name": HEADER, "string_match": {"exact": value}}


def _present() -> Json:
    return {"name": HEADER, "present_match": True}


def refusal_route(match: Json, message: str) -> Json:
    """400 with the stage service's error body, for a header that names no split served here."""
    return {"match": {**match, "headers": [_present()]},
            "direct_response": {"status": 400, "body": {"inline_string": json.dumps({"error": message})}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}


def pinned_routes(match: Json, by_split: dict[str, Json], unassigned: Json, message: str) -> list[Json]:
    """The routes of one match: per split its action, the refusal, then `unassigned` for no header."""
    routes = [{"match": {**match, "headers": [_exact(split)]}, "route": action} for split, action in by_split.items()]
    return [*routes, refusal_route(match, message), {"match": dict(match), "route": unassigned}]


def assigning(action: Json, assignments: list[Assignment], cluster_of: dict[tuple[str, str], str]) -> Json:
    """`action` (timeout, retries) to the assignments' clusters by weight, each setting the header to its split."""
    out = {k: v for k, v in action.items() if k not in ("cluster", "weighted_clusters")}
    out["weighted_clusters"] = {"clusters": [{
        "name": cluster_of[(a.split, a.version)], "weight": a.weight,
        "request_headers_to_add": [{"header": {"key": HEADER, "value": a.split},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    } for a in assignments]}
    return out
