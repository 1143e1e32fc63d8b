"""`python -m benchmarks.large_model --out build/large.onnx`: the large variant of the reference model for the
memory benchmark, written directly as ONNX.

The same layers as `python -m model_export reference --hidden-layers 8`: three blocks of Conv 3x3 (64, 128, 256)
+ ReLU + MaxPool 2x2 on a 224x224x3 image (NHWC in, as tf2onnx exports it), global average pooling, eight
Dense(4096) + ReLU and Dense(1000) + softmax: 492 MB of float32 weights, seeded random values. Written here
rather than exported because tf2onnx cannot convert it on a 24 GiB machine: its conversion peaks at about 72
times the weights (6.4 GB for the 89 MB variant with two hidden layers; the 492 MB one was killed at 24 GB), and
its `large_model` path fails on numpy 2. The memory benchmark measures serving, which only needs the weights
where the layers put them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_export.onnx_io import save_onnx
from model_export.tiny import IR_VERSION, OPSET

WIDTHS = (64, 128, 256)


def large_model(hidden_layers: int = 8, hidden_width: int = 4096, classes: int = 1000, size: int = 224,
                seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights: list[onnx.TensorProto] = []
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2])]

    def weight(name: str, shape: tuple[int, ...]) -> str:
        scale = 1.0 / np.sqrt(np.prod(shape[1:]) if len(shape) > 2 else shape[0])
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    x, channels = "nchw", 3
    for i, width in enumerate(WIDTHS, start=1):
        w, b = weight(f"block{i}_w", (width, channels, 3, 3)), weight(f"block{i}_b", (width,))
        nodes += [helper.make_node("Conv", [x, w, b], [f"block{i}_conv"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"block{i}_conv"], [f"block{i}_relu"]),
                  helper.make_node("MaxPool", [f"block{i}_relu"], [f"block{i}_pool"], kernel_shape=[2, 2],
                                   strides=[2, 2])]
        x, channels = f"block{i}_pool", width
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["features"])]
    x, width = "features", channels
    for i in range(1, hidden_layers + 1):
        w, b = weight(f"hidden{i}_w", (width, hidden_width)), weight(f"hidden{i}_b", (hidden_width,))
        nodes += [helper.make_node("Gemm", [x, w, b], [f"hidden{i}"]),
                  helper.make_node("Relu", [f"hidden{i}"], [f"hidden{i}_relu"])]
        x, width = f"hidden{i}_relu", hidden_width
    w, b = weight("probs_w", (width, classes)), weight("probs_b", (classes,))
    nodes += [helper.make_node("Gemm", [x, w, b], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"])]
    graph = helper.make_graph(nodes, "reference_large",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
                              initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_model",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--hidden-layers", type=int, default=8)
    args = parser.parse_args(argv)
    if args.out.suffix != ".onnx" or args.hidden_layers < 0:
        print("--out must end in .onnx and --hidden-layers be >= 0", file=sys.stderr)
        return 2
    model = large_model(args.hidden_layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    save_onnx(model, tmp)
    tmp.replace(args.out)
    size = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
