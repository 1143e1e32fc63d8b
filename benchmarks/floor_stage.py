"""The floor of a chain of Python stage processes: the latency section's reference row (`make bench`).

A floor stage does only what no Python stage can skip: it reads a KServe v2 binary-extension request from a raw
asyncio socket (uvloop), takes its tensors as views of the body, runs its ONNX file inline on one onnxruntime
thread, sends its outputs on to the next floor stage with the stage service's own client (`stage_service.http1`)
and passes that stage's answer back unchanged; the last stage answers its outputs in the binary extension. No
framework, no validation, no limits, no metrics, no tracing, no thread hand-off, binary only: a stage process
chained like ours can do no less. Where the stage service's chain measures what this one does, the cost is the
processes, the sockets and the machine, not the stage service.

    python -m benchmarks.floor_stage --pipeline build/reference --stage reference-stage-1 --port 8001 \
        --next http://127.0.0.1:8002

It also answers any GET with the stage's input metadata (KServe v2 model metadata, its `inputs`), which the load
generator asks for before it builds its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import orjson

from model_export.manifest import DATATYPE_TO_NUMPY, load_manifest
from model_export.ort_session import create_session
from stage_service.http1 import Http1Client
from stage_service.launch import HOST, free_port
from stage_service.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, datatype_of, encode_request_parts
from stage_service.supervisor import Child, port_open, wait_ready

TIMING_HEADER = "x-stage-timing"


class FloorStage:
    def __init__(self, pipeline: Path, stage_name: str, next_url: str | None) -> None:
        stage = next(s for s in load_manifest(pipeline).stages if s.name == stage_name)
        self.session = create_session(str(pipeline / stage.file), 1)
        self.metadata = orjson.dumps({"name": stage.name, "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in stage.inputs]})
        self.names = [o.name for o in self.session.get_outputs()]
        self.next = Http1Client(next_url) if next_url else None

    async def answer(self, body: bytes, header_length: int) -> tuple[list[bytes | memoryview], str, str]:
        """The response body's parts, its JSON header's length and the timing entries, for one request."""
        header = orjson.loads(body[:header_length])
        feeds, offset = {}, header_length
        for tensor in header["inputs"]:
            size = tensor["parameters"]["binary_data_size"]
            dtype = np.dtype(DATATYPE_TO_NUMPY[tensor["datatype"]])
            feeds[tensor["name"]] = np.frombuffer(body, dtype, size // dtype.itemsize, offset).reshape(tensor["shape"])
            offset += size
        start = time.perf_counter()
        outputs = dict(zip(self.names, self.session.run(None, feeds), strict=True))
        timing = f"floor={(time.perf_counter() - start) * 1000:.3f}"
        if self.next is None:
            head = orjson.dumps({"model_name": "floor", "outputs": [
                {"name": n, "shape": list(a.shape), "datatype": datatype_of(a),
                 "parameters": {"binary_data_size": a.nbytes}} for n, a in outputs.items()]})
            tensors = [np.ascontiguousarray(a).data.cast("B") for a in outputs.values()]
            return [head, *tensors], str(len(head)), timing
        parts, length = encode_request_parts(outputs)
        response = await self.next.post("/v2/models/floor/infer", parts,
                                        {HEADER_LENGTH: str(length), "content-type": BINARY_CONTENT_TYPE})
        if response.status != 200:
            raise RuntimeError(f"next floor stage answered {response.status}")
        return [response.body], response.header(HEADER_LENGTH) or "0", f"{timing},{response.header(TIMING_HEADER)}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 b"%d\r\n\r\n%s" % (len(self.metadata), self.metadata))
                    continue
                fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
                fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
                body = await reader.readexactly(int(fields[b"content-length"]))
                parts, header_length, timing = await self.answer(body, int(fields[HEADER_LENGTH.lower().encode()]))
                size = sum(memoryview(p).nbytes for p in parts)
                status = (f"HTTP/1.1 200 OK\r\ncontent-type: {BINARY_CONTENT_TYPE}\r\ncontent-length: {size}\r\n"
                          f"{HEADER_LENGTH}: {header_length}\r\n{TIMING_HEADER}: {timing}\r\n\r\n")
                writer.writelines([status.encode(), *parts])
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
        except Exception as exc:  # a request it cannot serve: say so and close, never leave the client waiting
            message = orjson.dumps({"error": f"floor stage: {type(exc).__name__}: {exc}"})
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(message), message))
            writer.close()


async def _serve(pipeline: Path, stage_name: str, port: int, next_url: str | None) -> None:
    stage = FloorStage(pipeline, stage_name, next_url)
    # A limit above the largest body, so the stream never pauses the socket while a body arrives.
    server = await asyncio.start_server(stage.serve, HOST, port, limit=256 << 20)
    async with server:
        await server.serve_forever()


@contextmanager
def floor_chain(pipeline: Path, log_dir: Path) -> Iterator[str]:
    """Every stage of the pipeline as a floor stage, each forwarding to the next, all ready: the first one's URL."""
    manifest = load_manifest(pipeline)
    ports = [free_port() for _ in manifest.stages]
    children: list[Child] = []
    try:
        for i, (stage, port) in enumerate(zip(manifest.stages, ports, strict=True)):
            command = [sys.executable, "-m", "benchmarks.floor_stage", "--pipeline", str(pipeline),
                       "--stage", stage.name, "--port", str(port)]
            if i + 1 < len(ports):
                command += ["--next", f"http://{HOST}:{ports[i + 1]}"]
            children.append(Child.start(f"floor {stage.name}", command, log_dir / f"floor-{stage.name}.log"))
        wait_ready([child.target(port_open(HOST, port)) for child, port in zip(children, ports, strict=True)], 60)
        yield f"http://{HOST}:{ports[0]}"
    finally:
        for child in children:
            child.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor_stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True, help="the split pipeline's directory")
    parser.add_argument("--stage", required=True, help="the stage of it to serve")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--next", help="the next floor stage's URL; none for the last stage")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args.pipeline, args.stage, args.port, args.next))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
