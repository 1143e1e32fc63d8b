"""`python -m mesh parity`: how close the local mesh is to Istio, hop by hop.

For every caller -> callee hop, each field of the policy (route timeout, retries, weighted clusters,
outlier detection, connection pool, buffer limits, upstream TLS SAN, inbound RBAC) as the local mesh's
Envoy config holds it beside what istiod generates for the rendered tree. istiod's side is read from
--istiod, the JSON `python -m tests.judges.istiod OVERLAY --out FILE` writes with Istio's own generator
(built by `make istio-tools`); `make parity` does both for the committed tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from mesh import parity
from mesh.plan import resolve
from mesh.policy import PolicyError, load_policy
from model_export.cli_help import compact_table
from model_export.manifest import ManifestError, load_manifest


def register(sub: Any) -> None:
    """Add `parity` to the `python -m mesh` parser."""
    p = sub.add_parser("parity", help="compare the local mesh's Envoy config with istiod's, hop by hop",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, type=Path, help="directory holding pipeline.json (or the file)")
    p.add_argument("--policy", type=Path, default=None, help="mesh.yaml; default: the built-in defaults")
    p.add_argument("--istiod", required=True, type=Path,
                   help="istiod's generated config for the rendered tree (python -m tests.judges.istiod)")
    p.add_argument("--differences", action="store_true", help="print only the fields that differ")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=_parity)


def _parity(args: argparse.Namespace) -> int:
    try:
        plan = resolve(load_policy(args.policy), load_manifest(args.pipeline))
        generated = json.loads(args.istiod.read_text())
        rows = parity.compare(plan, generated)
    except (ManifestError, PolicyError) as exc:
        print(f"parity: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"parity: --istiod {args.istiod}: {exc}; expected the JSON of python -m tests.judges.istiod",
              file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"parity: --istiod {args.istiod} does not match this pipeline and policy: {exc.args[0]}",
              file=sys.stderr)
        return 2
    shown = [r for r in rows if not r.same] if args.differences else rows
    if args.json:
        print(json.dumps([{"hop": r.hop, "field": r.field, "local": r.local, "istiod": r.istiod, "same": r.same,
                           "reason": r.reason} for r in shown], indent=1))
    else:
        console = Console()
        for hop in dict.fromkeys(r.hop for r in shown):
            table = compact_table("field", "local", "istiod", "")
            for r in (r for r in shown if r.hop == hop):
                table.add_row(r.field, parity.short(r.local, 17), parity.short(r.istiod, 17),
                              "" if r.same else ("listed" if r.reason else "DIFFERS"))
            console.print(f"[bold]{hop}[/bold]")
            console.print(table)
        print(f"{sum(r.same for r in rows)} of {len(rows)} fields equal; "
              f"{len(parity.unexplained(rows))} differ without a listed reason")
    return 1 if parity.unexplained(rows) else 0
