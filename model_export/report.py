"""Tables and plots of a pipeline's stages and of a model's clean cut points."""

from __future__ import annotations

from pathlib import Path

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from model_export.cli_help import compact_table, fits
from model_export.manifest import Manifest, TensorSpec

MB = 1_000_000


def _tensor(t: TensorSpec) -> str:
    return f"{t.name} {t.datatype}{t.shape}"


def stage_rows(manifest: Manifest) -> list[dict[str, object]]:
    """The stage table as plain data (`--json`)."""
    return [{"stage": s.name, "version": s.version, "inputs": [t.model_dump() for t in s.inputs],
             "outputs": [t.model_dump() for t in s.outputs], "param_bytes": s.cost.param_bytes,
             "latency_ms": s.cost.latency_ms, "bytes_out": s.cost.bytes_out} for s in manifest.stages]


def title(manifest: Manifest) -> str:
    return (f"pipeline {manifest.name}: {len(manifest.stages)} stages "
            f"(measured at batch {manifest.profile.batch}, {manifest.profile.threads} thread(s))")


def _costs(manifest: Manifest, tensors: bool) -> Table:
    columns = ("stage", "inputs", "outputs") if tensors else ("stage",)
    table = compact_table(*columns, "params MB", "latency ms", "bytes out",
                          right=("params MB", "latency ms", "bytes out"))
    for s in manifest.stages:
        cells = [s.name, "\n".join(map(_tensor, s.inputs)), "\n".join(map(_tensor, s.outputs))] if tensors else [s.name]
        table.add_row(*cells, f"{s.cost.param_bytes / MB:.2f}", f"{s.cost.latency_ms:.3f}", f"{s.cost.bytes_out:,}")
    table.add_row("total", *([""] * (len(columns) - 1)),
                  f"{sum(s.cost.param_bytes for s in manifest.stages) / MB:.2f}",
                  f"{sum(s.cost.latency_ms for s in manifest.stages):.3f}", "")
    return table


def stage_report(manifest: Manifest, width: int) -> list[RenderableType]:
    """The title and one table of every stage with its tensors, if it fits `width`; else the costs alone and
    each stage's tensors as lines below, so a tensor name is never broken (it can be copied into
    `split --cut`). Print each part with soft_wrap=True."""
    wide = _costs(manifest, tensors=True)
    if fits(wide, width):
        return [Text(title(manifest)), wide]
    out: list[RenderableType] = [Text(title(manifest)), _costs(manifest, tensors=False),
                                 Text("tensors (name datatype[shape]) per stage:")]
    for s in manifest.stages:
        out.append(Text(f"  {s.name}"))
        for way, specs in (("in ", s.inputs), ("out", s.outputs)):
            for t in specs:
                line = f"    {way} {_tensor(t)}"
                # The name whole on its line; its datatype and shape on the next where both do not fit.
                out += [Text(line)] if len(line) <= width else [Text(f"    {way} {t.name}"),
                                                               Text(f"        {t.datatype}{t.shape}")]
    return out


def plot_stages(manifest: Manifest, out: Path) -> Path:
    """Bar chart of each stage's measured latency and the bytes it sends on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name.removeprefix(f"{manifest.name}-") for s in manifest.stages]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.bar(names, [s.cost.latency_ms for s in manifest.stages], color="tab:blue")
    ax1.set_ylabel("latency, ms (batch 1)")
    ax1.set_title("measured stage latency")
    ax2.bar(names, [s.cost.bytes_out / MB for s in manifest.stages], color="tab:orange")
    ax2.set_ylabel("MB per sample")
    ax2.set_title("bytes sent to the next stage")
    fig.suptitle(f"pipeline {manifest.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
