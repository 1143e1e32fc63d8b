"""The MLServer custom runtime that `mlserver_peer` points `model-settings.json` at (`implementation`).

Imported by MLServer itself, inside `.venv-peers/mlserver`, so it imports mlserver at module level; nothing in
the product's venv imports it. Written as MLServer's custom-runtime docs write one: an async `load` and
`predict`, tensors decoded and encoded with `NumpyCodec`.
"""

from __future__ import annotations

from typing import Any

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

from benchmarks.peer_servers.common import create_session


class OnnxStage(MLModel):  # type: ignore[misc]
    """One stage ONNX file (`parameters.uri`) in an onnxruntime session set up like the stage service's."""

    async def load(self) -> bool:
        uri = await get_model_uri(self.settings)
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self._session: Any = create_session(uri, int(extra.get("threads", 1)))
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._output_names, feed)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(n, a) for n, a in zip(self._output_names, results, strict=True)],
        )
