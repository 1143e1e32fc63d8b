"""Split-version pinning: several splits of one model served side by side, every request on one split only.

A new split of the same model (other cut points, another number of stages) has stages that do not fit the old
one's: the tensors at its cuts differ. Each split is named by its manifest's `split_id` (a digest of its cut
tensors) and `mesh.yaml` lists the splits with a weight each (`splits:`). `resolve_pinning` joins that list
with every split's manifest into a `Pinning`: one `Plan` per split, and the gateway's route for requests that
name no split. Both meshes are written from it:

- the gateway sends a request whose `x-pipeline-version` names a split to that split's first stage, answers
  400 naming the known splits for any other value, and assigns a request without the header a split by the
  weights, setting the header as it routes it (per weighted destination, as Istio's `headers.request.set`);
- every stage app carries the header on to the next hop (an `x-pipeline-` header), and refuses one that
  names another split than its own (stage_service.dataplane);
- every hop into a stage routes on the header: the local sidecars' outbound routes match it, and in Istio
  the stage's VirtualService has one `match` per split, to subsets labelled by `split`.

A request once assigned therefore never crosses: a weight change only moves requests not yet assigned.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from mesh.plan import Hop, Plan, resolve
from mesh.policy import Policy, PolicyError
from model_export.manifest import Manifest, ManifestError, load_manifest
from stage_service.chain import PIPELINE_VERSION_HEADER

HEADER = PIPELINE_VERSION_HEADER


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitPlan(_Frozen):
    """One split: its name (the manifest's `split_id`), its share of unassigned requests, where its manifest
    is, and its plan of hops."""

    name: str
    weight: int
    pipeline_dir: str
    plan: Plan


class Assignment(_Frozen):
    """One destination of the gateway's route for a request that names no split: a version of a split's
    first stage, its share of such requests, and the split the request is pinned to on the way."""

    split: str
    version: str
    weight: int


class Pinning(_Frozen):
    """Every split served, the pipeline the mesh was started with first."""

    splits: list[SplitPlan]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.splits]

    def split(self, name: str) -> SplitPlan:
        for s in self.splits:
            if s.name == name:
                return s
        raise KeyError(f"unknown split {name!r}; the mesh serves {self.names}")

    def with_primary(self, plan: Plan) -> Pinning:
        """The same splits, the running pipeline's with `plan` (as a changed policy resolved it)."""
        first = self.splits[0].model_copy(update={"plan": plan})
        return self.model_copy(update={"splits": [first, *self.splits[1:]]})

    def refusal(self) -> str:
        """The gateway's answer (400) to a request that names no known split."""
        return (f"{HEADER} names no split of this pipeline; expected one of {', '.join(self.names)} "
                "(or no header: the gateway assigns one)")

    def unassigned_hop(self) -> Hop:
        """Whose route (timeout, retries, fault) the gateway's route for unassigned requests takes: the gateway
        hop with the longest timeout among the splits that get such requests, so it covers every one of them."""
        hops = [s.plan.hops[0] for s in self.splits if s.weight > 0]
        return max(hops, key=lambda h: h.route.timeout_s)

    def assignments(self) -> list[Assignment]:
        """Split weight x first-stage version weight, as whole percents summing to 100 (largest remainder);
        a destination that rounds to 0 gets no unassigned requests (it still serves those pinned to it)."""
        exact = [(s.name, d.version, s.weight * d.weight / 100) for s in self.splits if s.weight > 0
                 for d in s.plan.hops[0].route.destinations]
        floors = [int(w) for _, _, w in exact]
        order = sorted(range(len(exact)), key=lambda i: exact[i][2] - floors[i], reverse=True)
        for i in order[:100 - sum(floors)]:
            floors[i] += 1
        return [Assignment(split=s, version=v, weight=w) for (s, v, _), w in zip(exact, floors, strict=True) if w > 0]


def split_path(pipeline: str, policy_dir: Path | None) -> Path:
    """A split's pipeline directory as the policy names it; a relative one is relative to the policy file."""
    path = Path(pipeline)
    if not path.is_absolute() and policy_dir is not None:
        path = policy_dir / path
    return path.resolve()


def _manifest_of(path: Path, where: str) -> Manifest:
    try:
        return load_manifest(path)
    except ManifestError as exc:
        raise PolicyError(f"{where}: {exc}") from exc


def _same_model(primary: Manifest, other: Manifest, where: str) -> list[str]:
    def io(m: Manifest) -> list[tuple[str, str]]:
        return [(t.name, t.datatype) for t in [*m.inputs, *m.outputs]]

    if other.name != primary.name or io(other) != io(primary):
        return [f"{where}: pipeline {other.name!r} with inputs and outputs {io(other)} is not a split of "
                f"{primary.name!r} ({io(primary)}); splits must serve the same model to the same clients"]
    return []


def resolve_pinning(policy: Policy, manifest: Manifest, pipeline_dir: Path,
                    policy_dir: Path | None) -> Pinning | None:
    """The plan of every split `policy.splits` lists (None: no pinning). `manifest` in `pipeline_dir` is the
    pipeline the mesh runs; it must be one of them. Raises PolicyError naming every problem."""
    if policy.splits is None:
        return None
    here = pipeline_dir.resolve()
    paths = [split_path(s.pipeline, policy_dir) for s in policy.splits]
    if here not in paths:
        raise PolicyError(f"splits: the pipeline the mesh runs ({here}) is not one of the splits listed "
                          f"({[str(p) for p in paths]})")
    problems: list[str] = []
    out: list[SplitPlan] = []
    for i, (entry, path) in enumerate(zip(policy.splits, paths, strict=True)):
        where = f"splits.{i} ({entry.pipeline})"
        primary = path == here
        if primary and entry.stages:
            problems.append(f"{where}: the running pipeline's stage policy is the top-level `stages`; leave this "
                            "entry's `stages` out")
        split_manifest = manifest if primary else _manifest_of(path, where)
        problems += _same_model(manifest, split_manifest, where)
        own = policy if primary else policy.model_copy(update={"stages": entry.stages})
        try:
            plan = resolve(own.model_copy(update={"splits": None}), split_manifest)
        except PolicyError as exc:
            problems.append(f"{where}: {exc}")
            continue
        out.append(SplitPlan(name=split_manifest.split_id, weight=entry.weight, pipeline_dir=str(path), plan=plan))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        problems.append(f"splits: two pipelines have the same cuts ({names}): they are one split; roll a changed "
                        "stage out as a version (`mesh canary`) instead")
    if problems:
        raise PolicyError("invalid splits:\n  - " + "\n  - ".join(problems))
    out.sort(key=lambda s: s.pipeline_dir != str(here))  # the running pipeline first
    return Pinning(splits=out)
