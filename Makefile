# Two commands do everything on a machine with only Python 3.11 and make: `make demo`, `make test`.
# (`make test` also builds and runs the stage image where a Docker engine can run: see `image`.)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD := build
PIPELINE := $(BUILD)/reference
STAGES ?= 4
VARIANT ?= cpu
# TensorFlow's start-up banners (oneDNN, absl) say nothing a user of these commands needs.
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_ENABLE_ONEDNN_OPTS := 0
export PYTHONUNBUFFERED := 1

.PHONY: venv demo render reliability test lint typecheck istio-tools parity cluster-tools image bench bench-split bench-hop bench-peers bench-cpu peers-venv rollout-demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,mesh,validate,loadtest,dev]'
	touch $(STAMP)

$(BUILD)/reference.keras: | $(STAMP)
	$(PY) -m model_export reference --out $@

$(BUILD)/reference.onnx: $(BUILD)/reference.keras
	$(PY) -m model_export export $< --out $@

# The demo request goes through the gateway's TLS (checked against the mesh's CA) with a token from `mesh token`.
demo: $(BUILD)/reference.onnx
	rm -rf $(PIPELINE)
	$(PY) -m model_export split $(BUILD)/reference.onnx --stages $(STAGES) --out $(PIPELINE)
	$(PY) -m model_export verify $(PIPELINE)
	$(PY) -m model_export inspect $(PIPELINE) --plot $(BUILD)/reference-stages.png
	$(PY) -m mesh up --pipeline $(PIPELINE) --policy mesh.yaml --detach
	token=$$($(PY) -m mesh token --subject make-demo --expires-in 300) && \
	  $(PY) -m mesh demo-request --pipeline $(PIPELINE) --token "$$token"; rc=$$?; $(PY) -m mesh down; exit $$rc
	@echo "note: the reference model is untrained (random weights, fixed seed), so its top-5 is flat;"
	@echo "      README 'Your own model' shows how to serve a trained one."

# Re-render the committed Kubernetes tree from the committed manifest and policy.
# The replicas, CPU and autoscaling come from `mesh plan` at PLAN_RPS (mesh-planned.yaml: mesh.yaml with the
# planned stage blocks), so the prod overlay scales each stage by its measured cost.
PLAN_RPS := 200
render: | $(STAMP)
	$(PY) -m mesh plan --pipeline examples/reference --target-rps $(PLAN_RPS) --base mesh.yaml --out mesh-planned.yaml
	$(PY) -m mesh render --pipeline examples/reference --policy mesh-planned.yaml --out kustomize

# Istio's binaries (istioctl, and istio-judge: tools/istio/judge, Istio's analyzers and istiod's xDS
# generator), built from the istio.io/istio Go module that tools/istio/go.mod pins, into
# ${XDG_CACHE_HOME:-~/.cache}/meshpipe/istio/<hash of go.mod+go.sum>/ when missing: about 25 min the first time on
# 2 busy cores, seconds once built. Where Go is missing the Istio judge tests do not run, and say so.
istio-tools: | $(STAMP)
	@if command -v go >/dev/null; then $(PY) -m tests.judges.istio build; \
	else echo "Go is missing: Istio's tools are not built, the Istio judge tests will not run"; fi

# How close the local mesh is to Istio: istiod's own Envoy config for the committed tree (dev overlay) beside
# the local mesh's, hop by hop (README "How close the local mesh is to Istio").
parity: istio-tools
	mkdir -p $(BUILD)
	$(PY) -m tests.judges.istiod kustomize/overlays/dev --out $(BUILD)/istiod-dev.json
	$(PY) -m mesh parity --pipeline examples/reference --policy mesh-planned.yaml --istiod $(BUILD)/istiod-dev.json

lint: $(STAMP)
	$(VENV)/bin/ruff check model_export stage_service mesh loadtest benchmarks tests
	$(VENV)/bin/lint-imports --no-logo

typecheck: $(STAMP)
	$(VENV)/bin/mypy model_export stage_service mesh loadtest benchmarks

# A real kube-apiserver for tests/judges, built from Kubernetes' Go modules at the release tools/kube/go.mod
# pins, into ${XDG_CACHE_HOME:-~/.cache}/meshpipe/kube/<hash of go.mod+go.sum>/ once (the first build took
# 25 min here on 2 busy cores), and etcd from Debian's etcd-server. Needs Go >= 1.26.
cluster-tools: | $(STAMP)
	tools/kube/install-etcd.sh
	$(PY) -m tests.judges.apiserver build

# The image tests (tests/image, marker `docker`) need a Docker engine: scripts/docker-engine.sh starts one
# (installing Debian's docker.io where none is); where it cannot, one line says so and the rest still runs.
# Where Go is missing the API-server tests do not run (they say so in one line); where it is, cluster-tools
# builds what they need first.
# TEST_WORKERS pytest processes (pytest-xdist), each taking a whole test module at a time, so a module's
# mesh or chain is started once: most tests wait on processes, so two keep 2 cores busier (14.5 min here against
# about 25 in one). Modules go out in collection order, the longest first (tests/conftest.py LONGEST_FIRST):
# xdist's own order, most tests first, left the long few-test modules for last. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
test: lint typecheck istio-tools
	@if command -v go >/dev/null; then $(MAKE) --no-print-directory cluster-tools; \
	else echo "Go is missing: kube-apiserver is not built, the API-server tests will not run"; fi
	@if engine=$$(scripts/docker-engine.sh 2>&1); then \
	  $(PYTEST); \
	else \
	  echo "tests/image: the image tests did not run: $$(printf '%s\n' "$$engine" | tail -n 1)"; \
	  $(PYTEST) -m "not docker"; \
	fi

# The stage image, built by the Docker engine: meshpipe/stage-service:<version> (VARIANT=gpu: <version>-gpu).
# Where no engine runs, scripts/docker-engine.sh does what it takes on Debian (root): `apt-get install
# docker.io`, `dockerd` started in the background. Where python:3.11-slim-bookworm cannot be pulled,
# scripts/base-image.sh makes a stand-in from Debian's packages (debootstrap; about 2.5 minutes, once:
# the engine keeps it). First build about 80 s; after a change of the serving code about 20 s.
image:
	scripts/stage-image.sh $(VARIANT)

# The large variant for the memory benchmark: about 490 MB of weights over eight Dense layers, the layers of
# `model_export reference --hidden-layers 8`, written directly as ONNX: tf2onnx's conversion of it needs about
# 35 GB (benchmarks/large_model.py says what was measured).
$(BUILD)/large.onnx: | $(STAMP)
	$(PY) -m benchmarks.large_model --out $@

$(BUILD)/large/pipeline.json: $(BUILD)/large.onnx
	rm -rf $(BUILD)/large
	$(PY) -m model_export split $< --stages 4 --balance params --runs 3 --external-data --out $(BUILD)/large

$(BUILD)/large-whole/pipeline.json: $(BUILD)/large.onnx
	rm -rf $(BUILD)/large-whole
	$(PY) -m model_export split $< --stages 1 --runs 3 --external-data --out $(BUILD)/large-whole

$(PIPELINE)/pipeline.json: $(BUILD)/reference.onnx
	rm -rf $(PIPELINE)
	$(PY) -m model_export split $< --stages $(STAGES) --out $(PIPELINE)

# One stage's life on the reference model (issue 16): retrain the last stage, check its contract, canary 10% ->
# rollback -> canary 10% -> 50% -> promote on a running local mesh under load; fails on any failed request.
rollout-demo: $(PIPELINE)/pipeline.json
	PY=$(PY) BUILD=$(BUILD) scripts/rollout-demo.sh

# Issue 14's longer runs: fuzzed bad input (stage app and gateway) and a replica SIGKILLed, SIGTERMed and frozen under load, written
# into RELIABILITY.md with the machine and its load (about 4 minutes on 2 busy cores).
reliability: | $(STAMP)
	$(PY) -m benchmarks.reliability --policy mesh.yaml --examples 500 --rate 20 --steady 15 --fault 60 --target-freeze 10

# Everything measured in one run on this machine: BENCHMARKS.md (tables) and build/bench*/ (JSON, PNG).
bench: $(PIPELINE)/pipeline.json $(BUILD)/large/pipeline.json $(BUILD)/large-whole/pipeline.json
	$(PY) -m benchmarks.suite --pipeline $(PIPELINE) --model $(BUILD)/reference.onnx --large $(BUILD)/large \
		--large-whole $(BUILD)/large-whole --out $(BUILD)/bench
	$(MAKE) bench-split bench-hop bench-peers bench-cpu

bench-split: $(BUILD)/reference.onnx
	$(PY) -m benchmarks.split $(BUILD)/reference.onnx --out $(BUILD)/bench-split
	$(PY) -m benchmarks.split_zoo --out $(BUILD)/bench-split

bench-hop: | $(STAMP)
	$(PY) -m benchmarks.hop --out $(BUILD)/bench-hop

# Where a request's CPU goes in the local mesh: each app's, each Envoy's and the load generator's ms per request.
bench-cpu: $(PIPELINE)/pipeline.json
	$(PY) -m benchmarks.cpu_share --pipeline $(PIPELINE) --out $(BUILD)/bench-cpu/cpu-share.json \
		--benchmarks BENCHMARKS.md

# Peer servers (MLServer, KServe, Ray Serve) for the side-by-side bench: each in its own venv under
# .venv-peers/ (their pins conflict with each other), never in the product's; pins in benchmarks/peer_servers/requirements/.
PEERS := kserve mlserver ray
PEERS_VENV := .venv-peers

$(PEERS_VENV)/%/.installed: benchmarks/peer_servers/requirements/%.txt
	rm -rf $(PEERS_VENV)/$*
	$(PYTHON) -m venv $(PEERS_VENV)/$*
	$(PEERS_VENV)/$*/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/$*/bin/python -m pip install --quiet -r $<
	touch $@

peers-venv: $(foreach p,$(PEERS),$(PEERS_VENV)/$(p)/.installed)

# The peers' workload is one fixed stage, block 1 of the reference model (0.6 MB in, 3.2 MB out), cut by hand: the
# demo pipeline's stage 1 moved with each split (block 1 on one machine, block 2 on another), and runs compared badly.
PEERS_PIPELINE := $(BUILD)/peers-block1
$(PEERS_PIPELINE)/pipeline.json: $(BUILD)/reference.onnx
	rm -rf $(PEERS_PIPELINE)
	$(PY) -m model_export split $< --cut reference_1/block1_conv_1/convolution__6:0 \
		--cut reference_1/block1_pool_1/MaxPool2d:0 --out $(PEERS_PIPELINE)

bench-peers: peers-venv $(PEERS_PIPELINE)/pipeline.json | $(STAMP)
	$(PY) -m benchmarks.peers --pipeline $(PEERS_PIPELINE) --stage peers-block1-stage-1 --out $(BUILD)/bench-peers

clean:
	rm -rf $(BUILD) $(VENV)
