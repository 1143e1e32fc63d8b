#!/usr/bin/env bash
# One stage's life on the reference model, end to end (issue 16): retrain its head's stage on generated data,
# check the new pipeline's contract, then on a running local mesh canary it at 10%, roll it back, canary it
# again at 10% and 50%, and promote it, while an open-loop load test runs through all of it. Exit 1 when
# any request of the load test failed or any step was refused.
set -euo pipefail
PY=${PY:-.venv/bin/python}
BUILD=${BUILD:-build}
LOAD_S=${LOAD_S:-150}
OLD=$BUILD/reference
NEW=$BUILD/reference-v2
step() { printf '\n== %s\n' "$*"; }

step "labelled data and the retrained stage of the head (the Dense layer probs)"
$PY -m model_export reference-data --model "$BUILD/reference.keras" --out "$BUILD/rollout-data.npz" --samples 64
rm -rf "$NEW"
$PY -m model_export retrain-stage "$OLD" --layer probs --model "$BUILD/reference.keras" \
    --data "$BUILD/rollout-data.npz" --epochs 1 --out "$NEW"
# the stage retrain-stage gave a new version: the one to roll out
STAGE=$($PY -c "import json, sys; old, new = (json.load(open(f'{d}/pipeline.json'))['stages'] for d in sys.argv[1:])
print(next(n['name'] for o, n in zip(old, new) if o['version'] != n['version']))" "$OLD" "$NEW")
$PY -m model_export check-contract "$OLD" "$NEW"

step "the mesh, and ${LOAD_S} s of steady load through it"
state=$BUILD/rollout-mesh
$PY -m mesh down --state-dir "$state" >/dev/null 2>&1 || true
$PY -m mesh up --pipeline "$OLD" --policy mesh.yaml --detach --gateway-port 0 --state-dir "$state" --json \
    > "$BUILD/rollout-mesh.json"
trap '$PY -m mesh down --state-dir "$state" >/dev/null' EXIT
field() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$BUILD/rollout-mesh.json" "$1"; }
# the gateway's TLS checked against the mesh's CA, and a token for the whole run
token=$($PY -m mesh token --subject rollout-demo --expires-in $(( LOAD_S + 600 )) --state-dir "$state")
$PY -m loadtest run --url "$(field gateway_url)" --cacert "$(field gateway_ca)" --token "$token" --model reference \
    --rate 4 --duration "$LOAD_S" --out "$BUILD/rollout-load" &
load=$!
sleep 5

started=$(date +%s)
mesh() { step "mesh $*"; $PY -m mesh "$@" --state-dir "$state"; }
mesh canary --stage "$STAGE" --version v2 --weight 10 --pipeline "$NEW"
mesh status || true  # exit 1 while a process is not ready: shown, not fatal
mesh rollback --stage "$STAGE"
mesh canary --stage "$STAGE" --version v2 --weight 10 --pipeline "$NEW"
mesh canary --stage "$STAGE" --version v2 --weight 50
mesh promote --stage "$STAGE"
mesh status || true  # exit 1 while a process is not ready: shown, not fatal
took=$(( $(date +%s) - started ))
if ! kill -0 "$load" 2>/dev/null; then
  echo "error: the rollout took ${took} s, longer than the ${LOAD_S} s of load; raise LOAD_S" >&2
  exit 1
fi

step "the load test (every request must have succeeded)"
wait "$load"
echo "rollout under load: retrained, checked, canary 10% -> rollback -> canary 10% -> 50% -> promote in ${took} s, 0 failed"
