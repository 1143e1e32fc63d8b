"""`python -m model_export` as a user reads it: every option explained with its default, tables that fit
80 columns without breaking a tensor name, and `--json` beside every table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_export.__main__ import build_parser
from tests.tiny import IR_VERSION, OPSET, write_tiny_pipeline

# Long, as Keras' own names are ("reference_1/block1_pool_1/MaxPool2d:0"), so 80 columns cannot hold a table.
LONG = [f"functional_model_1/residual_block_{i}/expanded_conv_1/Relu:0" for i in range(3)]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options_without_help_or_default(parser: argparse.ArgumentParser) -> list[str]:
    """Every option whose help is missing, or whose help does not say its default."""
    missing = []
    for name, sub in subcommands(parser).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            shown = formatter._get_help_string(action)  # type: ignore[attr-defined]
            if not action.help:
                missing.append(f"{name} {flag}: no help")
            elif (action.default is not None and action.default is not False and "default" not in shown
                  and not isinstance(action, argparse._StoreConstAction)):  # a flag's help says what it sets
                missing.append(f"{name} {flag}: default {action.default!r} not shown")
    return missing


def test_every_option_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    assert options_without_help_or_default(parser) == []
    split = subcommands(parser)["split"].format_help()
    assert "(default: latency)" in split and "(default: 10)" in split
    assert "(default: None)" not in split and "(default: False)" not in split


def run(*args: str, columns: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_export", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": str(columns)})


def long_named_chain(path: Path) -> Path:
    """x -> Relu -> Relu -> Relu -> MatMul -> y, every inner tensor named like LONG."""
    names = ["x", *LONG]
    nodes = [helper.make_node("Relu", [a], [b]) for a, b in zip(names, names[1:], strict=False)]
    weight = numpy_helper.from_array(np.ones((8, 2), np.float32), "w")
    nodes.append(helper.make_node("MatMul", [LONG[-1], "w"], ["y"]))
    graph = helper.make_graph(nodes, "long", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
                              initializer=[weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION), path)
    return path


def test_cuts_fit_80_columns_and_never_break_a_tensor_name(tmp_path: Path) -> None:
    model = long_named_chain(tmp_path / "long.onnx")
    narrow = run("cuts", str(model), columns=80)
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()[1:]  # the title names the model's path: the terminal may wrap it
    assert all(len(line) <= 80 for line in lines), narrow.stdout
    for name in LONG:
        assert any(name in line for line in lines), (name, narrow.stdout)
    wide = run("cuts", str(model), columns=200)
    assert any(LONG[0] in line and "1x8" in line for line in wide.stdout.splitlines()), wide.stdout
    data = json.loads(run("cuts", str(model), "--json", columns=80).stdout)
    assert [c["tensor"] for c in data["cuts"]] == LONG and data["cuts"][0]["shape"] == [1, 8]


def test_inspect_fits_80_columns_and_has_json(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "tiny")
    manifest_path = tmp_path / "tiny" / "pipeline.json"
    manifest = json.loads(manifest_path.read_text())
    for i, stage in enumerate(manifest["stages"]):  # long cut names, as a Keras model has them
        if i > 0:
            stage["inputs"][0]["name"] = LONG[i - 1]
        if i < len(manifest["stages"]) - 1:
            stage["outputs"][0]["name"] = LONG[i]
    manifest_path.write_text(json.dumps(manifest))
    narrow = run("inspect", str(tmp_path / "tiny"), columns=80)
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), narrow.stdout
    for name in LONG[:2]:
        assert sum(name in line for line in lines) == 2, narrow.stdout  # out of one stage, into the next
    wide = run("inspect", str(tmp_path / "tiny"), columns=250)
    assert any("tiny-stage-1" in line and LONG[0] in line and LONG[1] in line for line in wide.stdout.splitlines())
    data = json.loads(run("inspect", str(tmp_path / "tiny"), "--json", columns=80).stdout)
    assert [s["stage"] for s in data["stages"]] == ["tiny-stage-0", "tiny-stage-1", "tiny-stage-2"]
    assert data["stages"][1]["inputs"][0]["name"] == LONG[0]
