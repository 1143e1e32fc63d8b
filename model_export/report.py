"""Tables and plots of a pipeline's stages and of a model's clean cut points."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from model_export.manifest import Manifest

MB = 1_000_000


def _tensors(specs) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(f"{t.name} {t.datatype}{t.shape}" for t in specs)


def stage_table(manifest: Manifest) -> Table:
    table = Table(title=f"pipeline {manifest.name}: {len(manifest.stages)} stages "
                        f"(measured at batch {manifest.profile.batch}, {manifest.profile.threads} thread(s))")
    for col in ("stage", "inputs", "outputs"):
        table.add_column(col, overflow="fold")
    for col in ("params MB", "latency ms", "bytes out"):
        table.add_column(col, justify="right")
    for s in manifest.stages:
        table.add_row(s.name, _tensors(s.inputs), _tensors(s.outputs), f"{s.cost.param_bytes / MB:.2f}",
                      f"{s.cost.latency_ms:.3f}", f"{s.cost.bytes_out:,}")
    total = sum(s.cost.latency_ms for s in manifest.stages)
    table.add_row("total", "", "", f"{sum(s.cost.param_bytes for s in manifest.stages) / MB:.2f}", f"{total:.3f}", "")
    return table


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
