"""Peer model servers serving one of our stage files, for `python -m benchmarks.peers`.

Each peer module (`mlserver_peer`, `kserve_peer`, `ray_peer`) runs in its own virtual environment under
`.venv-peers/<peer>` (made by `make peers-venv`; their pins conflict with each other and none of them is a
dependency of the product), and imports its framework lazily, inside `main()`, so that the product's venv can
import, lint and type-check this package without any of them installed.

Every peer serves ONE stage ONNX file with onnxruntime under the session settings the stage service uses
(`common.create_session`), over the KServe v2 REST protocol, so the load generator runs against each one
unchanged.
"""
