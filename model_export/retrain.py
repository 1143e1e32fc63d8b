"""`retrain-stage`: fine-tune the Keras layers of one stage, all others frozen, and write it as a new version.

Order: validate (pipeline, stage, model, data), then train, then export in a fresh process exactly as
`export` does (tf2onnx names tensors by the process's own counters, so the cut tensors keep their names
only when converted as the original was), cut at the old pipeline's cut tensors with `split`, and check:
every other stage must be byte-identical (sha256) to the old one, and the new pipeline must pass
`check-contract`. Only then is the new directory written, by `stage_version`.

Which layers a stage holds is read from its ONNX graph: tf2onnx names every node `<model>_N/<layer>_N/<op>`,
so the nodes that read a weight name the layers whose weights lie in the stage.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from model_export.contract import check_contract
from model_export.errors import ExportError
from model_export.keras_source import as_functional, load_keras
from model_export.manifest import Manifest, load_manifest, sha256_file, verify_stage_file
from model_export.onnx_io import load_onnx
from model_export.split import Track, no_progress, split_model
from model_export.stage_version import write_stage_version
from model_export.training_data import TrainingData, load_training_data

SUFFIX = re.compile(r"_\d+$")


@dataclass(frozen=True)
class TrainingOptions:
    epochs: int = 3
    learning_rate: float = 1e-3
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ExportError(f"--epochs and --batch-size must be at least 1, got {self.epochs}, {self.batch_size}")
        if not self.learning_rate > 0:
            raise ExportError(f"--learning-rate must be positive, got {self.learning_rate}")


@dataclass
class RetrainResult:
    manifest: Manifest
    stage: str
    version: str
    layers: list[str]
    loss_before: float
    loss_after: float
    epoch_losses: list[float] = field(default_factory=list)


def stage_layer_scopes(stage: onnx.ModelProto) -> set[str]:
    """The layer scopes (`dense_1`) of the nodes in `stage` that read a weight."""
    weights = {i.name for i in stage.graph.initializer}
    scopes = set()
    for node in stage.graph.node:
        parts = node.name.split("/")
        if len(parts) >= 3 and any(i in weights for i in node.input):
            scopes.add(parts[1])
    return scopes


def stage_layers(model: Any, stage: onnx.ModelProto) -> list[str]:
    """The names of the Keras layers with trainable weights whose weights lie in `stage`."""
    scopes = stage_layer_scopes(stage)
    with_weights = [layer.name for layer in model.layers if layer.trainable_weights]
    found = []
    for name in with_weights:
        if name in {SUFFIX.sub("", s) for s in scopes} or (name in scopes and SUFFIX.search(name)):
            found.append(name)
    return found


def stage_holding(pipeline_dir: Path, manifest: Manifest, model: Any, layer: str) -> tuple[str, onnx.ModelProto]:
    """The stage whose weights include Keras layer `layer`'s, and its graph: how a user names "the head" without
    knowing where a split by measured time put it. ExportError if the model has no such layer with weights."""
    with_weights = [ly.name for ly in model.layers if ly.trainable_weights]
    if layer not in with_weights:
        raise ExportError(f"--layer {layer!r}: the model has no layer of that name with trainable weights; its "
                          f"layers with weights are {with_weights}")
    for s in manifest.stages:
        graph = load_onnx(pipeline_dir / s.file)
        if layer in stage_layers(model, graph):
            return s.name, graph
    raise ExportError(f"--layer {layer!r}: no stage of {manifest.name} holds its weights; is the model the one "
                      "this pipeline was cut from?")


def _keras_io(model: Any) -> tuple[list[str], dict[str, tuple[int | None, ...]], tuple[int | None, ...]]:
    if len(model.outputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(model.outputs)} outputs; retrain-stage fits one output")
    names = [t.name.split(":")[0] for t in model.inputs]
    shapes = {n: tuple(t.shape[1:]) for n, t in zip(names, model.inputs, strict=True)}
    return names, shapes, tuple(model.outputs[0].shape[1:])


def train(model: Any, data: TrainingData, layers: list[str], options: TrainingOptions,
          callbacks: list[Any]) -> tuple[float, float, list[float]]:
    """Fit with only `layers` trainable; the loss on `data` before and after, and each epoch's mean loss."""
    import keras

    keras.utils.set_random_seed(options.seed)
    for layer in model.layers:
        layer.trainable = layer.name in layers
    loss = "sparse_categorical_crossentropy" if data.classification else "mean_squared_error"
    model.compile(optimizer=keras.optimizers.Adam(options.learning_rate), loss=loss)
    inputs = [data.inputs[t.name.split(":")[0]] for t in model.inputs]
    x = inputs if len(inputs) > 1 else inputs[0]
    before = float(model.evaluate(x, data.labels, batch_size=options.batch_size, verbose=0))
    history = model.fit(x, data.labels, epochs=options.epochs, batch_size=options.batch_size, shuffle=True,
                        verbose=0, callbacks=callbacks)
    after = float(model.evaluate(x, data.labels, batch_size=options.batch_size, verbose=0))
    return before, after, [float(v) for v in history.history["loss"]]


def export_in_fresh_process(keras_path: Path, onnx_path: Path, opset: int) -> None:
    """`python -m model_export export`, as the original was made (see the module docstring)."""
    command = [sys.executable, "-m", "model_export", "export", str(keras_path), "--out", str(onnx_path),
               "--opset", str(opset)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise ExportError(f"exporting the retrained model failed: {lines[-1]}")


def _opset(stage: onnx.ModelProto) -> int:
    return next(o.version for o in stage.opset_import if o.domain in ("", "ai.onnx"))


def cut_like(old: Manifest, whole: Path, out: Path, track: Track) -> Manifest:
    """Split `whole` at the old pipeline's cut tensors, with its name and profile; the tensors must exist."""
    cuts = [t.name for s in old.stages[:-1] for t in s.outputs]
    try:
        return split_model(whole, out, stages=len(old.stages), cuts=cuts, balance=old.profile.balance,
                           threads=old.profile.threads, runs=old.profile.runs, name=old.name, track=track).manifest
    except ExportError as exc:
        raise ExportError(f"the cut tensors moved: the retrained model cannot be cut at {cuts} as the old pipeline "
                          f"was ({exc}); split it anew and roll it out as a new pipeline version") from exc


def changed_elsewhere(old_dir: Path, old: Manifest, new_dir: Path, new: Manifest, stage: str) -> list[str]:
    return [f"{was.name} (sha256 {was.sha256[:12]} -> {sha256_file(new_dir / now.file)[:12]})"
            for was, now in zip(old.stages, new.stages, strict=True)
            if was.name != stage and sha256_file(new_dir / now.file) != was.sha256]


def retrain_stage(pipeline_dir: Path, stage: str | None, model_path: Path, data_path: Path, out: Path,
                  options: TrainingOptions, callbacks: list[Any] | None = None,
                  track: Track = no_progress, on_layers: Callable[[str, list[str]], None] | None = None,
                  layer: str | None = None) -> RetrainResult:
    """Retrain `stage`, or (`layer`) the stage that holds that Keras layer's weights."""
    # 1. validate, before any training
    options.check()
    if (stage is None) == (layer is None):
        raise ExportError("give --stage NAME or --layer NAME (the stage holding that Keras layer), one of the two")
    old = load_manifest(pipeline_dir)
    if stage is not None:
        try:
            old.index(stage)
        except KeyError as exc:
            raise ExportError(f"--stage: {exc.args[0]}") from exc
    if out.exists():
        raise ExportError(f"--out {out} already exists; expected a new directory")
    for s in old.stages:
        verify_stage_file(pipeline_dir, s)
    model = as_functional(load_keras(model_path))
    if layer is not None:
        stage, old_stage = stage_holding(pipeline_dir, old, model, layer)
    else:
        assert stage is not None
        old_stage = load_onnx(pipeline_dir / old.stage(stage).file)
    index = old.index(stage)
    names, shapes, output_shape = _keras_io(model)
    data = load_training_data(data_path, names, shapes, output_shape)
    layers = stage_layers(model, old_stage)
    if not layers:
        raise ExportError(f"stage {stage} holds no Keras layer with trainable weights (its nodes name the layers "
                          f"{sorted(stage_layer_scopes(old_stage)) or 'none'}); nothing to retrain")
    if on_layers:
        on_layers(stage, layers)
    # 2. train and export
    before, after, epochs = train(model, data, layers, options, callbacks or [])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.retrain.") as tmp:
        work = Path(tmp)
        model.save(work / "model.keras")
        export_in_fresh_process(work / "model.keras", work / "model.onnx", _opset(old_stage))
        # 3. cut at the same tensors and check nothing else moved
        cut = cut_like(old, work / "model.onnx", work / "split", track)
        moved = changed_elsewhere(pipeline_dir, old, work / "split", cut, stage)
        if moved:
            raise ExportError(f"retraining {stage} changed other stages too: {', '.join(moved)}; is {model_path} the "
                              "model this pipeline was cut from?")
        new_stage = cut.stages[index]
        if sha256_file(work / "split" / new_stage.file) == old.stages[index].sha256:
            raise ExportError(f"retraining left {stage} byte-identical (learning rate {options.learning_rate}); "
                              "no new version written")
        staged = work / "pipeline"
        manifest = write_stage_version(pipeline_dir, staged, stage, load_onnx(work / "split" / new_stage.file),
                                       cost=new_stage.cost, source=work / "model.onnx")
        shutil.copyfile(work / "model.keras", staged / "model.keras")
        report = check_contract(pipeline_dir, staged)
        if not report.fits:
            reasons = "; ".join(report.reasons())
            raise ExportError(f"the retrained {stage} does not fit beside the old stages: {reasons}")
        staged.rename(out)
    return RetrainResult(manifest, stage, manifest.stages[index].version, layers, before, after, epochs)
