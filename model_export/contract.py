"""`check-contract`: would a new pipeline's stages fit beside the old one's, stage by stage?

During a rollout an old stage K-1 feeds a new stage K, which feeds an old stage K+1 (and the new ones
feed each other once everything is rolled). So every stage of the new pipeline must take what its
neighbours, old and new, send, and send what they expect: the same tensor names, the same datatypes, and
shapes the receiver accepts (a fixed dimension only from a sender fixed at that size; a dynamic one from
anything). The pipeline's own inputs and outputs are the clients' contract and count as neighbours too.
Stages whose bytes changed are listed, so a change where none was meant is seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model_export.manifest import Manifest, Stage, TensorSpec, load_manifest, verify_stage_file


@dataclass
class StageVerdict:
    """One stage of the new pipeline against the old: whether its bytes changed and what does not fit."""

    name: str
    old_version: str | None
    new_version: str
    changed: bool
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"stage": self.name, "old_version": self.old_version, "new_version": self.new_version,
                "changed": self.changed, "fits": self.fits, "problems": self.problems}


@dataclass
class ContractReport:
    """Every stage's verdict, and what is wrong with the pipelines as a whole (stage lists that differ)."""

    old: Path
    new: Path
    stages: list[StageVerdict]
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems and all(s.fits for s in self.stages)

    @property
    def changed(self) -> list[str]:
        return [s.name for s in self.stages if s.changed]

    def reasons(self) -> list[str]:
        return [*self.problems, *(f"{s.name}: {p}" for s in self.stages for p in s.problems)]

    def as_dict(self) -> dict[str, object]:
        return {"old": str(self.old), "new": str(self.new), "fits": self.fits, "changed": self.changed,
                "problems": self.problems, "stages": [s.as_dict() for s in self.stages]}


def shape_accepts(receiver: list[int], sender: list[int]) -> bool:
    """Whether a tensor of the sender's shape is always one the receiver takes (-1: any size)."""
    if len(receiver) != len(sender):
        return False
    return all(r == -1 or r == s for r, s in zip(receiver, sender, strict=True))


def tensor_problems(sent: list[TensorSpec], expected: list[TensorSpec], sender: str, receiver: str) -> list[str]:
    """What in `sent` (by `sender`) does not fit what `receiver` expects; empty when it fits."""
    by_name = {t.name: t for t in sent}
    problems = []
    missing = [t.name for t in expected if t.name not in by_name]
    extra = sorted(by_name.keys() - {t.name for t in expected})
    if missing or extra:
        problems.append(f"{receiver} expects tensors {[t.name for t in expected]} but {sender} sends "
                        f"{[t.name for t in sent]}")
    for want in expected:
        got = by_name.get(want.name)
        if got is None:
            continue
        if got.datatype != want.datatype:
            problems.append(f"tensor {want.name!r}: {sender} sends {got.datatype}, {receiver} expects {want.datatype}")
        elif not shape_accepts(want.shape, got.shape):
            problems.append(f"tensor {want.name!r}: {sender} sends shape {got.shape}, {receiver} expects "
                            f"{want.shape} (-1: any size)")
    return problems


def _neighbour_problems(stage: Stage, index: int, old: Manifest, new: Manifest) -> list[str]:
    problems: list[str] = []
    who = f"new {stage.name} {stage.version}"
    for side, pipeline in (("old", old), ("new", new)):
        if index == 0:
            problems += tensor_problems(pipeline.inputs, stage.inputs, f"{side} pipeline's clients", who)
        else:
            before = pipeline.stages[index - 1]
            problems += tensor_problems(before.outputs, stage.inputs, f"{side} {before.name} {before.version}", who)
        if index == len(pipeline.stages) - 1:
            problems += tensor_problems(stage.outputs, pipeline.outputs, who, f"{side} pipeline's clients")
        else:
            after = pipeline.stages[index + 1]
            problems += tensor_problems(stage.outputs, after.inputs, who, f"{side} {after.name} {after.version}")
    return list(dict.fromkeys(problems))  # the old and new neighbour are often the same stage


def check_contract(old_dir: Path, new_dir: Path) -> ContractReport:
    """Compare two pipeline directories; ManifestError when either cannot be read or its files do not match
    its manifest (their sha256 is what tells a changed stage)."""
    old, new = load_manifest(old_dir), load_manifest(new_dir)
    for directory, manifest in ((old_dir, old), (new_dir, new)):
        for stage in manifest.stages:
            verify_stage_file(Path(directory), stage)
    report = ContractReport(Path(old_dir), Path(new_dir), [])
    old_names, new_names = [s.name for s in old.stages], [s.name for s in new.stages]
    if old_names != new_names:
        report.problems.append(
            f"the stages differ: old {old_names}, new {new_names}; a new split changes the cut tensors, so its "
            "stages cannot serve beside the old ones (roll the whole pipeline as a new version instead)")
        return report
    for index, (was, now) in enumerate(zip(old.stages, new.stages, strict=True)):
        verdict = StageVerdict(now.name, was.version, now.version, changed=was.sha256 != now.sha256)
        verdict.problems = _neighbour_problems(now, index, old, new)
        report.stages.append(verdict)
    return report
