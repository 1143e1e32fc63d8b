"""Every shape of Keras model a user brings (model_export.zoo, all weights=None): export, cuts, split into 2
and 3, verify, merge, each judged against Keras's own predictions; three of them served end to end through
`mesh up` with tritonclient (every input and output, JSON and binary, batch 1 and 4)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

from mesh import local
from model_export import zoo
from model_export.dims import value_dims
from model_export.export import ExportResult, export_keras
from model_export.keras_source import keras_source, load_keras
from model_export.manifest import Manifest, load_manifest
from model_export.merge import merge_pipeline
from model_export.onnx_io import load_onnx
from model_export.ort_session import create_session
from model_export.proof import EXPORT_TOLERANCE, Proof
from model_export.samples import Case
from model_export.split import find_candidates, split_model
from model_export.verify import Chain, cases_for, prove_pipeline
from tests.mesh.local_mesh import running_mesh
from tests.model_export.test_keras_models import assert_no_cut_inside_a_residual_block

SLOW = {"resnet50", "efficientnetb0", "mobilenetv3small"}
# weights=None EfficientNetB0 and MobileNetV3Small answer the same for every input, even 0-255 images: the
# proof must say so (their stages are still proven on the cut tensors, which do vary).
CONSTANT_OUTPUT = {"efficientnetb0", "mobilenetv3small"}
SERVED = ("cnn", "two-in-two-out", "lstm")
RESIDUAL = {"resnet50", "mobilenetv3small", "transformer"}


@dataclass
class Exported:
    name: str
    directory: Path
    onnx: Path
    result: ExportResult
    keras_predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    _expected: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def expected(self, case: Case) -> dict[str, np.ndarray]:
        """Keras's predictions for a proof case (the cases are the same for every split: computed once)."""
        if case.label not in self._expected:
            self._expected[case.label] = self.keras_predict(case.feeds)
        return self._expected[case.label]

    def split(self, stages: int) -> Path:
        out = self.directory / f"zoo-{self.name}-{stages}"
        if not out.exists():
            # the large models balance on parameter bytes: no session per segment (latency is tested elsewhere)
            split_model(self.onnx, out, stages, runs=1, balance="params" if self.name in SLOW else "latency")
        return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Exported]]:
    """Each zoo model saved as .keras and exported once per test module."""
    done: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in done:
            directory = tmp_path_factory.mktemp(f"zoo-{name}")
            keras_file = zoo.save(name, directory / f"{name}.keras")
            result = export_keras(keras_file, directory / f"{name}.onnx")
            predict = keras_source(load_keras(keras_file)).predict
            done[name] = Exported(name, directory, result.path, result, predict)
        return done[name]

    yield get


Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _against_keras(model: Exported, manifest: Manifest, run: Run, cases: list[Case]) -> Proof:
    proof = Proof(EXPORT_TOLERANCE, cases=len(cases))
    for case in cases:
        expected, got = model.expected(case), run(case.feeds)
        for t in manifest.outputs:
            proof.compare(t.name, expected[t.name], got[t.name], case.label)
    return proof.check(f"{model.name} against Keras")


def _zoo_params() -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in zoo.ZOO]


@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_model_every_step(name: str, exported: Callable[[str], Exported], caplog: pytest.LogCaptureFixture) -> None:
    model = exported(name)
    # tf2onnx logs a traceback when an optimizer of its gives up (MobileNetV3Small): the user must not see it
    assert not [r for r in caplog.records if r.name.startswith("tf2onnx") and r.levelno >= logging.WARNING]
    assert model.result.proof.passed and model.result.proof.cases >= 2
    # realistic inputs (0-255 images, every token id) make the outputs vary, except where the model is constant
    constant = model.result.outputs if name in CONSTANT_OUTPUT else []
    assert model.result.proof.degenerate == constant, model.result.proof.summary()
    whole = load_onnx(model.onnx)
    assert all(value_dims(v, v.name)[0] == "batch" for v in [*whole.graph.input, *whole.graph.output])
    candidates = find_candidates(whole)
    assert len(candidates.cuts) >= 2
    if name in RESIDUAL:
        assert set(candidates.cuts) <= assert_no_cut_inside_a_residual_block(whole)
    for stages in (2, 3):
        directory = model.split(stages)
        manifest = load_manifest(directory)
        assert len(manifest.stages) == stages
        assert all(t.dim_names and t.dim_names[0] == "batch" for s in manifest.stages for t in [*s.inputs, *s.outputs])
        proof = prove_pipeline(directory)
        assert proof.tensors == {t.name for s in manifest.stages for t in s.outputs}  # every cut and output
        cases = cases_for(manifest, whole, None)
        _against_keras(model, manifest, Chain(directory, manifest).run, cases)
        merged = directory.with_suffix(".merged.onnx")
        merge_pipeline(directory, merged)
        _against_keras(model, manifest, _runner(merged, [t.name for t in manifest.outputs]), cases)


def _runner(path: Path, names: list[str]) -> Run:
    session = create_session(str(path))
    return lambda feeds: dict(zip(names, session.run(names, feeds), strict=True))


def test_sequential_keeps_its_names(exported: Callable[[str], Exported]) -> None:
    """tf2onnx alone fails on every Keras 3 Sequential (KeyError 'keras_tensor_N')."""
    model = exported("mlp")
    assert model.result.inputs == ["features"] and len(model.result.outputs) == 1
    assert model.result.outputs[0].startswith("dense")


def test_variable_length_survives_every_step(exported: Callable[[str], Exported]) -> None:
    """The LSTM's sequence length stays dynamic and named in the export, the manifest and every stage file;
    the recurrent loop's time-major tensors are not offered as cuts."""
    model = exported("lstm")
    whole = load_onnx(model.onnx)
    assert value_dims(whole.graph.input[0], "tokens") == ["batch", "sequence"]
    candidates = find_candidates(whole)
    time_major = [t for t in candidates.structural if t not in candidates.cuts]
    assert time_major and all(candidates.values[t].dims.index("batch") > 0 for t in time_major)
    directory = model.split(3)
    manifest = load_manifest(directory)
    assert manifest.inputs[0].shape == [-1, -1] and manifest.inputs[0].dim_names == ["batch", "sequence"]
    first = onnx.load(str(directory / manifest.stages[0].file))
    assert value_dims(first.graph.input[0], "tokens") == ["batch", "sequence"]
    tokens = np.random.default_rng(0).integers(0, zoo.VOCAB, (4, 12)).astype(np.int32)
    got = Chain(directory, manifest).run({"tokens": tokens})
    want = model.keras_predict({"tokens": tokens})
    np.testing.assert_allclose(got[manifest.outputs[0].name], want[manifest.outputs[0].name], rtol=1e-3, atol=1e-4)
    merged = directory.with_name("lstm-merged.onnx")
    merge_pipeline(directory, merged)
    assert value_dims(onnx.load(str(merged)).graph.input[0], "tokens") == ["batch", "sequence"]


def test_savedmodel_directory_of_a_subclassed_model(tmp_path: Path) -> None:
    """A subclassed model Keras can trace, exported as a SavedModel directory (earlier: 'no such file')."""
    import keras

    class Scorer(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="scorer")
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.head = keras.layers.Dense(2)

        def call(self, x):  # type: ignore[no-untyped-def]
            return self.head(self.hidden(x))

    keras.utils.set_random_seed(0)
    scorer = Scorer()
    scorer(np.zeros((1, 6), np.float32))
    scorer.export(str(tmp_path / "saved"), verbose=False)
    result = export_keras(tmp_path / "saved", tmp_path / "scorer.onnx")
    assert result.proof.passed and result.proof.cases == 6
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    got = create_session(str(result.path)).run(None, {result.inputs[0]: x})[0]
    np.testing.assert_allclose(got, np.asarray(scorer(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SERVED)
def test_zoo_model_served_through_the_mesh(name: str, exported: Callable[[str], Exported], tmp_path: Path) -> None:
    """`mesh up` on the 2-stage split; tritonclient through the gateway, every input and output, JSON and
    binary, batch 1 and 4, against Keras's own predictions."""
    import tritonclient.http as triton

    model = exported(name)
    directory = model.split(2)
    manifest = load_manifest(directory)
    cases = cases_for(manifest, load_onnx(model.onnx), None)
    first = manifest.inputs[0].name
    with running_mesh(directory, None, tmp_path / ".mesh") as state:
        gateway = local.gateway_credentials(tmp_path / ".mesh", state, "tests")
        client = triton.InferenceServerClient(gateway.url.removeprefix("https://"), network_timeout=60, ssl=True,
                                              ssl_options={"ca_certs": str(gateway.ca)})
        try:
            meta = client.get_model_metadata(manifest.name, headers=gateway.headers)
            assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
                (t.name, t.datatype, t.shape) for t in manifest.inputs]
            for batch in (1, 4):
                feeds = [c for c in cases if c.feeds[first].shape[0] == batch][-1].feeds
                want = model.keras_predict(feeds)
                for binary in (True, False):
                    inputs = []
                    for t in manifest.inputs:
                        item = triton.InferInput(t.name, list(feeds[t.name].shape), t.datatype)
                        item.set_data_from_numpy(feeds[t.name], binary_data=binary)
                        inputs.append(item)
                    outputs = [triton.InferRequestedOutput(t.name, binary_data=binary) for t in manifest.outputs]
                    result = client.infer(manifest.name, inputs, outputs=outputs, headers=gateway.headers)
                    for t in manifest.outputs:
                        np.testing.assert_allclose(result.as_numpy(t.name), want[t.name], rtol=EXPORT_TOLERANCE.rtol,
                                                   atol=EXPORT_TOLERANCE.atol, err_msg=f"{t.name} batch {batch}")
        finally:
            client.close()


def test_legacy_h5_file(tmp_path: Path) -> None:
    h5 = zoo.save("cnn", tmp_path / "cnn.h5")
    result = export_keras(h5, tmp_path / "cnn.onnx")
    assert result.proof.passed and result.inputs == ["image"]
