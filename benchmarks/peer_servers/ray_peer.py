"""Ray Serve serving one stage: one deployment (one replica) with a FastAPI ingress that speaks KServe v2 REST.

    .venv-peers/ray/bin/python -m benchmarks.peer_servers.ray_peer --pipeline build/reference \\
        --stage reference-stage-1 --port 8080

What it is, exactly: Ray Serve has no KServe v2 / Open Inference Protocol server of its own, so the ingress is a
FastAPI app (`@serve.ingress`) whose routes are the v2 routes and whose tensor codec is the stage service's own
(`stage_service.protocol`, JSON and the binary extension). What differs from the stage service is therefore
Ray Serve's serving path: a local Ray cluster (GCS, raylet, controller), Ray's HTTP proxy actor, which receives
the request and hands it to the replica actor over Ray's RPC, and the replica, which runs the route. Inference
runs as in the stage service: one request at a time on a dedicated thread, off the replica's event loop. The
replica takes no Ray CPU reservation (`num_cpus=0`) so it schedules on a 2-core machine next to the proxy and
controller; Serve's access log is off, as the stage service's is by default. This process is the Ray driver:
it serves until SIGTERM/SIGINT, then shuts Serve and Ray down.

(No `from __future__ import annotations` here: FastAPI must see the route parameters' real types, which are
imported inside `build_app`.)
"""

import asyncio
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.peer_servers.common import StageFile, create_session, load_stage_file, parser


def build_app(stage: StageFile, threads: int) -> Any:
    """The bound Serve application: a v2 FastAPI ingress over one onnxruntime session."""
    import numpy as np
    from fastapi import FastAPI, Request, Response
    from fastapi.responses import JSONResponse
    from ray import serve

    from stage_service import protocol
    from stage_service.errors import InvalidInput

    api = FastAPI()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(api)
    class OnnxStage:
        def __init__(self) -> None:
            self.session = create_session(stage.file, threads)
            self.names = [o.name for o in self.session.get_outputs()]
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")

        @api.get("/v2/health/live")
        def live(self) -> dict[str, bool]:
            return {"live": True}

        @api.get("/v2/health/ready")
        def ready(self) -> dict[str, bool]:
            return {"ready": True}

        @api.get("/v2/models/{name}")
        def metadata(self, name: str) -> Response:
            if name != stage.name:
                return JSONResponse({"error": f"unknown model {name!r}"}, status_code=404)
            return JSONResponse(stage.metadata("onnxruntime"))

        @api.get("/v2/models/{name}/ready")
        def model_ready(self, name: str) -> Response:
            status = 200 if name == stage.name else 404
            return JSONResponse({"name": name, "ready": status == 200}, status_code=status)

        @api.post("/v2/models/{name}/infer")
        async def infer(self, name: str, request: Request) -> Response:
            if name != stage.name:
                return JSONResponse({"error": f"unknown model {name!r}"}, status_code=404)
            body = await request.body()
            try:
                req, tensors = protocol.decode_request(body, request.headers.get(protocol.HEADER_LENGTH))
            except InvalidInput as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self.executor, self.session.run, self.names, tensors)
            outputs: list[tuple[str, np.ndarray, bool]] = [
                (n, a, protocol.wants_binary(req, n)) for n, a in zip(self.names, results, strict=True)
            ]
            content, length = protocol.encode_response(name, stage.version, req.id,
                                                       protocol.echoed_parameters(req), outputs)
            if length is None:
                return Response(content, media_type=protocol.JSON_CONTENT_TYPE)
            return Response(content, media_type=protocol.BINARY_CONTENT_TYPE,
                            headers={protocol.HEADER_LENGTH: str(length)})

    deployment: Any = OnnxStage  # a ray.serve Deployment once decorated
    return deployment.bind()


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__ or "").parse_args(argv)
    stage = load_stage_file(args.pipeline, args.stage)
    # Ray's worker processes inherit the driver's environment: they must import loadtest and stage_service.
    repo = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, repo)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import serve

    ray.init(include_dashboard=False, num_cpus=os.cpu_count() or 1, logging_level=logging.WARNING,
             log_to_driver=False)
    logging_config = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config=logging_config)
    serve.run(build_app(stage, args.threads), name=stage.name, route_prefix="/", logging_config=logging_config)
    print(f"ray serve: {stage.name} on http://{args.host}:{args.port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
