"""Where an ONNX graph can be cut cleanly, and how to build the subgraph between two cuts.

A tensor `t` is a clean cut when the nodes it depends on (its ancestors) and all other nodes exchange
nothing but `t`: no other tensor computed from the graph inputs crosses from one side to the other, no
graph input is read after the cut, no graph output is produced before it. That is independent of the
order nodes are stored in, and it excludes by construction every point inside a residual block (the
skip path crosses there too) and inside a control-flow node (its subgraphs' outer-scope reads count as
inputs). Tensors that do not depend on any graph input (constants, shapes of weights) may be read on
both sides: their producers are copied into every stage that needs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx
from onnx import helper

from model_export.errors import ExportError


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names that a control-flow node's subgraphs read from the enclosing scope."""
    reads: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                defined.update(inner.output)
            for inner in g.node:
                reads.update(n for n in _node_inputs(inner) if n and n not in defined)
    return reads


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    return [n for n in node.input if n] + sorted(_subgraph_reads(node))


@dataclass
class GraphIndex:
    """Producer/consumer maps of one graph, and which tensors depend on its inputs."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    node_inputs: list[list[str]] = field(default_factory=list)
    dynamic: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        initializers = {i.name for i in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in initializers]
        index = cls(model, inputs, [o.name for o in model.graph.output])
        for i, node in enumerate(model.graph.node):
            reads = _node_inputs(node)
            index.node_inputs.append(reads)
            for name in reads:
                index.consumers.setdefault(name, []).append(i)
            for name in node.output:
                if name:
                    index.producer[name] = i
        index.dynamic = set(inputs)
        for i, node in enumerate(index._topological()):
            del i
            if any(n in index.dynamic for n in index.node_inputs[node]):
                index.dynamic.update(o for o in model.graph.node[node].output if o)
        return index

    def _topological(self) -> list[int]:
        """Kahn's algorithm over node indices (ONNX requires topological storage; we do not rely on it)."""
        nodes = self.model.graph.node
        waiting = [
            sum(1 for n in set(self.node_inputs[i]) if n in self.producer) for i in range(len(nodes))
        ]
        ready = [i for i, w in enumerate(waiting) if w == 0]
        order: list[int] = []
        while ready:
            i = ready.pop()
            order.append(i)
            for out in nodes[i].output:
                for c in sorted(set(self.consumers.get(out, []))):
                    waiting[c] -= 1
                    if waiting[c] == 0:
                        ready.append(c)
        if len(order) != len(nodes):
            raise ExportError("the graph has a cycle; expected a directed acyclic ONNX graph")
        return order

    def ancestors(self, tensors: Iterable[str]) -> set[int]:
        """Nodes that the tensors depend on, through dynamic tensors only (constants are copied)."""
        seen: set[int] = set()
        stack = [t for t in tensors if t in self.producer]
        while stack:
            node = self.producer[stack.pop()]
            if node in seen:
                continue
            seen.add(node)
            stack.extend(n for n in self.node_inputs[node] if n in self.producer and n in self.dynamic)
        return seen

    def crossing(self, tensor: str) -> set[str]:
        """Dynamic tensors that cross a cut at `tensor` besides `tensor` itself (empty set = clean)."""
        before = self.ancestors([tensor])
        crossing: set[str] = set()
        for name in self.inputs:
            if any(c not in before for c in self.consumers.get(name, [])):
                crossing.add(name)
        for node in before:
            for out in self.model.graph.node[node].output:
                if out == tensor or out not in self.dynamic:
                    continue
                if out in self.outputs or any(c not in before for c in self.consumers.get(out, [])):
                    crossing.add(out)
        return crossing

    def clean_cuts(self) -> list[str]:
        """Every clean single-tensor cut, ordered from the inputs towards the outputs."""
        cuts = []
        for name in self.producer:
            if name not in self.dynamic or name in self.outputs:
                continue
            if not any(c for c in self.consumers.get(name, [])):
                continue
            if not self.crossing(name):
                cuts.append(name)
        return sorted(cuts, key=lambda t: len(self.ancestors([t])))


def segment_nodes(index: GraphIndex, start: list[str], end: list[str]) -> list[int]:
    """Nodes computing `end` from `start` (constant producers included), in stored (topological) order."""
    stop = set(start)
    seen: set[int] = set()
    stack = [t for t in end if t not in stop]
    while stack:
        name = stack.pop()
        if name in stop or name not in index.producer:
            continue
        node = index.producer[name]
        if node in seen:
            continue
        seen.add(node)
        stack.extend(index.node_inputs[node])
    return sorted(seen)


def extract(index: GraphIndex, start: list[str], end: list[str], value_info: dict[str, onnx.ValueInfoProto],
            name: str) -> onnx.ModelProto:
    """The subgraph from tensors `start` to tensors `end` as a standalone model (initializers copied)."""
    model = index.model
    nodes = [model.graph.node[i] for i in segment_nodes(index, start, end)]
    used: set[str] = set()
    for node in nodes:
        used.update(_node_inputs(node))
    missing = [t for t in start + end if t not in value_info]
    if missing:
        raise ExportError(f"no type/shape known for tensors {missing}; expected shape inference to give them")
    initializers = [i for i in model.graph.initializer if i.name in used]
    graph = helper.make_graph(
        nodes,
        name,
        [value_info[t] for t in start],
        [value_info[t] for t in end],
        initializer=initializers,
    )
    inner = {o for n in nodes for o in n.output} - set(end)
    graph.value_info.extend(v for k, v in value_info.items() if k in inner)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="model_export.split")
    sub.ir_version = model.ir_version
    return sub
