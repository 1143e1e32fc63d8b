"""`python -m mesh render`: the pipeline and its policy as a kustomize tree of Kubernetes + Istio resources."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mesh.policy import PolicyError, load_policy
from mesh.render import RenderError, render_tree, write_tree
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


def _render(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.pipeline)
        policy = load_policy(args.policy)
        files = render_tree(manifest, policy)
    except (ManifestError, PolicyError, RenderError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    written = write_tree(files, args.out)
    print(f"wrote {len(written)} files for pipeline {manifest.name!r} under {args.out}/ "
          f"(overlays: dev, prod, gpu, canary)")
    return 0
