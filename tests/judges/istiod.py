"""istiod's own Envoy config for a rendered tree: the proxies of a cluster running it, and what istiod's
generator (istio-judge xds, Istio's pilot/test/xds fake discovery server) would push to each.

`python -m tests.judges.istiod OVERLAY_DIR --out FILE` writes that JSON for `python -m mesh parity`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mesh.k8s_validate import kustomize_build
from tests.judges import istio_tools

Obj = dict[str, Any]
KUBERNETES_KINDS = {"Namespace", "Service", "Pod", "EndpointSlice", "ServiceAccount"}


def _is_istio(obj: Obj) -> bool:
    return ".istio.io/" in obj["apiVersion"]


def proxies(cluster: list[Obj]) -> list[Obj]:
    """One proxy per Deployment (its first pod): the ingress gateway as Istio's router, every other pod's
    sidecar; named after the Deployment."""
    out = []
    for pod in (o for o in cluster if o["kind"] == "Pod" and o["metadata"]["name"].endswith("-0")):
        labels = pod["metadata"]["labels"]
        out.append({"name": pod["metadata"]["name"].removesuffix("-0"),
                    "type": "router" if labels.get("istio") == "ingressgateway" else "sidecar",
                    "namespace": pod["metadata"]["namespace"], "ip": pod["status"]["podIP"], "labels": labels,
                    "serviceAccount": pod["spec"].get("serviceAccountName", "default")})
    return out


def generated_config(objects: list[Obj]) -> dict[str, Any]:
    """istiod's listeners, clusters and routes for every proxy of the cluster running `objects`."""
    cluster = istio_tools.in_cluster(objects)
    return istio_tools.xds([o for o in cluster if _is_istio(o)],
                           [o for o in cluster if o["kind"] in KUBERNETES_KINDS], proxies(cluster))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.judges.istiod", description=__doc__)
    parser.add_argument("overlay", type=Path, help="a kustomize overlay directory, e.g. kustomize/overlays/dev")
    parser.add_argument("--out", type=Path, required=True, help="where to write istiod's config (JSON)")
    args = parser.parse_args(argv)
    dumped = generated_config(kustomize_build(args.overlay))
    args.out.write_text(json.dumps(dumped))
    print(f"{args.out}: istiod's config for {', '.join(sorted(dumped))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
