"""KServe's Python model server serving one stage: a `kserve.Model` subclass under `kserve.ModelServer`.

    .venv-peers/kserve/bin/python -m benchmarks.peer_servers.kserve_peer --pipeline build/reference \\
        --stage reference-stage-1 --port 8080

Written as KServe's custom-model docs write one: a synchronous `predict` taking an `InferRequest` and returning
an `InferResponse` (KServe calls it on its event loop), REST v2 and, with --grpc-port, KServe's v2 gRPC server,
one uvicorn worker. KServe's
REST v2 accepts JSON and the binary tensor extension. Its per-request access log line is turned down to
WARNING, as the stage service logs no access by default.
"""

from __future__ import annotations

import logging
from typing import Any

from benchmarks.peer_servers.common import StageFile, create_session, load_stage_file, parser


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__ or "")
    p.add_argument("--grpc-port", type=int, help="serve KServe's v2 gRPC here too (default: gRPC off)")
    args = p.parse_args(argv)
    stage = load_stage_file(args.pipeline, args.stage)

    import kserve
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.utils.utils import generate_uuid

    class OnnxStage(kserve.Model):  # type: ignore[misc]
        def __init__(self, stage: StageFile, threads: int) -> None:
            super().__init__(stage.name)
            self.stage, self.threads = stage, threads
            self.session: Any = None
            self.output_names = [t["name"] for t in stage.outputs]
            self.datatypes = {t["name"]: t["datatype"] for t in stage.outputs}

        def load(self) -> bool:
            self.session = create_session(self.stage.file, self.threads)
            self.ready = True
            return True

        def get_input_types(self) -> list[dict[str, Any]]:
            return self.stage.inputs

        def get_output_types(self) -> list[dict[str, Any]]:
            return self.stage.outputs

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                    response_headers: dict[str, str] | None = None) -> InferResponse:
            feed = {i.name: i.as_numpy() for i in payload.inputs}
            results = self.session.run(self.output_names, feed)
            outputs = []
            for name, array in zip(self.output_names, results, strict=True):
                out = InferOutput(name=name, shape=list(array.shape), datatype=self.datatypes[name])
                out.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
                outputs.append(out)
            return InferResponse(response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=outputs,
                                 use_binary_outputs=payload.use_binary_outputs)

    model = OnnxStage(stage, args.threads)
    model.load()
    server = kserve.ModelServer(http_port=args.port, grpc_port=args.grpc_port or 8081, workers=1,
                                enable_grpc=args.grpc_port is not None, enable_docs_url=False,
                                enable_latency_logging=False)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
