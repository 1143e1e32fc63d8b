"""`python -m mesh render`: the pipeline and its policy as a kustomize tree of Kubernetes + Istio resources;
`python -m mesh hops`: the plan of hops both meshes are written from."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from mesh.plan import Hop, resolve
from mesh.policy import PolicyError, load_policy
from mesh.render import RenderError, render_tree, write_tree
from model_export.cli_help import compact_table
from model_export.manifest import ManifestError, load_manifest


def register(sub: Any) -> None:
    """Add this side's subcommands to the `python -m mesh` parser."""
    p = sub.add_parser(
        "render",
        help="render Kubernetes and Istio resources (kustomize base, istio component, overlays)",
        description="Write base/, components/istio/ and overlays/{dev,prod,gpu,canary} under --out. "
        "Only pipeline.json is read from --pipeline; the ONNX files need not be there.",
    )
    p.add_argument("--pipeline", required=True, type=Path, help="directory holding pipeline.json (or the file)")
    p.add_argument("--policy", type=Path, default=None, help="mesh.yaml; default: the built-in defaults")
    p.add_argument("--out", type=Path, default=Path("kustomize"), help="output directory (default: kustomize)")
    p.set_defaults(func=_render)

    p = sub.add_parser(
        "hops",
        help="show the plan of hops: per caller -> callee the route, retries, outlier detection, who may call",
        description="Resolve mesh.yaml against pipeline.json and show, hop by hop, what the local Envoys and "
        "the Istio resources are both written from.",
    )
    p.add_argument("--pipeline", required=True, type=Path, help="directory holding pipeline.json (or the file)")
    p.add_argument("--policy", type=Path, default=None, help="mesh.yaml; default: the built-in defaults")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON instead of a table")
    p.set_defaults(func=_plan)


def _render(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.pipeline)
        policy = load_policy(args.policy)
        pipeline_dir = args.pipeline if args.pipeline.is_dir() else args.pipeline.parent
        files = render_tree(manifest, policy, pipeline_dir, args.policy.resolve().parent if args.policy else None)
    except (ManifestError, PolicyError, RenderError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    written = write_tree(files, args.out)
    print(f"wrote {len(written)} files for pipeline {manifest.name!r} under {args.out}/ "
          f"(overlays: dev, prod, gpu, canary)")
    return 0


def _row(hop: Hop) -> list[str]:
    route, od = hop.route, hop.upstream.outlier_detection
    weights = " ".join(d.version if d.weight == 100 else f"{d.version}:{d.weight}%" for d in route.destinations)
    tries = f"{route.attempts + 1} x {route.per_try_timeout_s:g}s" if route.attempts else "1"
    local = str(od.consecutive_local_origin_failures) if od.split_external_local_origin_errors else "-"
    fault = "yes" if route.fault is not None else ""
    return [hop.callee, weights, f"{route.timeout_s:g}s", tries,
            f"{od.consecutive_5xx}/{od.consecutive_gateway_errors}/{local}", fault]


def _plan(args: argparse.Namespace) -> int:
    try:
        plan = resolve(load_policy(args.policy), load_manifest(args.pipeline))
    except (ManifestError, PolicyError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.model_dump(mode="json"), indent=1))
        return 0
    table = compact_table("hop into", "versions", "timeout", "tries", "eject 5xx/gw/local", "fault")
    for hop in plan.hops:
        table.add_row(*_row(hop))
    console = Console()
    console.print(table)
    console.print(f"each hop is called by the stage before it (the first by the gateway, "
                  f"{plan.gateway_identity.principal}); --json shows every field")
    return 0
