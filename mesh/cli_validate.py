"""`python -m mesh validate`: a rendered kustomize tree checked offline, overlay by overlay.

Each overlay is built with `kubectl kustomize`; every built-in object is checked against Kubernetes'
schemas, every Istio object against Istio's CRDs (schema and CEL rules), and the whole against the
cross-object rules of `mesh.k8s_validate.semantic_problems`. Needs the `validate` extra
(`pip install -e '.[validate]'`) and Istio's `crd-all.gen.yaml` (from the `istio.io/istio` Go module:
`go mod download -json istio.io/istio@<version>` names its directory; the file is
`manifests/charts/base/files/crd-all.gen.yaml` inside it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add `validate` to the `python -m mesh` parser."""
    p = sub.add_parser("validate", help="check a rendered kustomize tree offline (schemas, CEL, cross-object)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tree", nargs="?", type=Path, default=Path("kustomize"),
                   help="the tree `mesh render` wrote (default: kustomize)")
    p.add_argument("--crds", required=True, type=Path, help="Istio's crd-all.gen.yaml")
    p.add_argument("--json", action="store_true", help="print {overlay: [problem, ...]} as JSON")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    try:
        from mesh import k8s_validate
    except ImportError as exc:
        print(f"validate: needs the validate extra (pip install -e '.[validate]'): {exc}", file=sys.stderr)
        return 2
    if not (args.tree / "overlays").is_dir():
        print(f"validate: {args.tree} has no overlays/ directory; expected a tree written by `mesh render`",
              file=sys.stderr)
        return 2
    if not args.crds.is_file():
        print(f"validate: --crds {args.crds} is not a file; expected Istio's crd-all.gen.yaml", file=sys.stderr)
        return 2
    try:
        results = k8s_validate.validate_tree(args.tree, k8s_validate.IstioSchemas.load(args.crds))
    except k8s_validate.ValidationFailure as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for overlay, problems in results.items():
            print(f"{overlay}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
            for problem in problems:
                print(f"  {problem}")
    return 1 if any(results.values()) else 0
