"""The build context of the stage image, as Docker filters it with `.dockerignore`, without building: every
COPY source is in it, it is enough to serve (`python -m stage_service` imports from it alone), and it holds
nothing of the export stack. `.dockerignore` is the one list of what goes in (the Dockerfile copies the
context whole); these tests read both files, so the three cannot disagree unnoticed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.image.build_context import ROOT, context_files, copy_sources, missing_sources

SERVING_PACKAGES = ("model_export/", "stage_service/")


def test_every_copy_source_is_in_the_filtered_context() -> None:
    assert copy_sources(ROOT / "Dockerfile")  # the parse found the COPY lines
    assert missing_sources(ROOT, ROOT / "Dockerfile") == []


def test_the_check_catches_a_file_the_ignore_file_leaves_out(tmp_path: Path) -> None:
    """The bug this check exists for: a Dockerfile copying a file that .dockerignore does not admit."""
    (tmp_path / "model_export").mkdir()
    for name in ("__init__.py", "manifest.py", "ort_session.py"):
        (tmp_path / "model_export" / name).write_text("")
    (tmp_path / ".dockerignore").write_text("*\n!model_export/__init__.py\n!model_export/manifest.py\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM scratch\nCOPY model_export/__init__.py model_export/manifest.py \\\n"
        "     model_export/ort_session.py model_export/\n"
    )
    assert missing_sources(tmp_path, tmp_path / "Dockerfile") == ["model_export/ort_session.py"]
    (tmp_path / ".dockerignore").write_text("*\n!model_export/\n")
    assert missing_sources(tmp_path, tmp_path / "Dockerfile") == []


def test_the_context_holds_only_the_serving_code() -> None:
    files = context_files()
    assert {"pyproject.toml", "stage_service/app.py", "model_export/manifest.py"} <= files
    strays = sorted(f for f in files if f != "pyproject.toml" and not f.startswith(SERVING_PACKAGES))
    assert strays == []
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert "model_export/export.py" not in files and "model_export/split.py" not in files


def test_the_filtered_context_is_enough_to_serve(tmp_path: Path) -> None:
    context = tmp_path / "image"
    for name in context_files():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, context / name)
    probe = (
        # forget the repository's editable install, so only the context's files can be found
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        "sys.path[:] = [p for p in sys.path if 'editable' not in p]\n"
        "import stage_service.app, stage_service.__main__, stage_service.launch\n"
        "import model_export\n"
        f"assert model_export.__file__.startswith({str(context)!r}), model_export.__file__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'tf2onnx', 'onnx', 'keras'})\n"
        "assert not bad, bad\n"
    )
    # cwd first on sys.path: only the context's packages are importable, with the venv's third-party ones
    result = subprocess.run([sys.executable, "-c", probe], cwd=context, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
