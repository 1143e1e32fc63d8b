"""The serving image holds exactly what `python -m stage_service` imports: the files the Dockerfile copies
are enough to start it, and nothing of the export stack (TensorFlow, tf2onnx, onnx) gets imported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def copied_paths() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context in the Dockerfile."""
    copies = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
            copies.append((parts[1:-1], parts[-1]))
    return copies


def test_the_files_the_dockerfile_copies_are_enough_to_serve(tmp_path: Path) -> None:
    context = tmp_path / "image"
    context.mkdir()
    for sources, dest in copied_paths():
        target = context / dest
        for src in sources:
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:  # a file into a directory (every such COPY here ends in '/')
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / src, target / Path(src).name)
    assert (context / "stage_service" / "app.py").exists() and (context / "pyproject.toml").exists()
    probe = (
        # forget the repository's editable install, so only the copied files can be found
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        "sys.path[:] = [p for p in sys.path if 'editable' not in p]\n"
        "import stage_service.app, stage_service.__main__, stage_service.launch\n"
        "import model_export\n"
        f"assert model_export.__file__.startswith({str(context)!r}), model_export.__file__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'tf2onnx', 'onnx', 'keras'})\n"
        "assert not bad, bad\n"
    )
    # cwd first on sys.path: only the copied packages are importable, with the venv's third-party ones
    result = subprocess.run([sys.executable, "-c", probe], cwd=context, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
