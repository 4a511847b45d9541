#!/usr/bin/env bash
# Wall times on the smoke profile, `dvc repro` beside `distillflow run` (README, "Running
# under Prefect"): a cold run, an all-cached run and a one-param change, each in a
# fresh temporary copy of this checkout; distillflow with no server (a temporary one
# per run) and with a running `prefect server start`.
#
#   bash benchmarks/flow_timings.sh            # about 5 minutes on 2 cores
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WORK=$(mktemp -d)
export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=false
export PATH="$(dirname "$(command -v "$PY")"):$PATH"
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@localhost GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@localhost
unset PREFECT_API_URL

copy() {  # the checkout's files minus outputs and dvc.lock, smoke profile as params.yaml, in a fresh git repo
  mkdir -p "$1"
  (cd "$ROOT" && git ls-files --cached --others --exclude-standard | grep -v -E '^(data/|metrics/|plots/|dvc.lock$)' |
     while read -r f; do [ -f "$f" ] && mkdir -p "$1/$(dirname "$f")" && cp -p "$f" "$1/$f"; done)
  cp "$ROOT/profiles/smoke.yaml" "$1/params.yaml"
  (cd "$1" && git init -q && git add -A && git commit -qm smoke)
}
timed() {  # label command...: wall time, load average, distillflow's own breakdown line
  local label=$1; shift
  local start end
  start=$(date +%s.%N)
  "$@" > "$WORK/out.log" 2>&1 || { cat "$WORK/out.log"; exit 1; }
  end=$(date +%s.%N)
  printf "%-46s %6.1f s   (load %s)\n" "$label" "$(echo "$end - $start" | bc)" "$(cut -d' ' -f1 /proc/loadavg)"
  grep -E "^flow run " "$WORK/out.log" | sed 's/^/    /' || true
}

copy "$WORK/dvc"; copy "$WORK/flow"
cd "$WORK/dvc"
timed "dvc repro (cold)" "$PY" -m dvc repro
timed "dvc repro (all cached)" "$PY" -m dvc repro
git add -A > /dev/null && git commit -qm run
timed "dvc exp run -S train.lr=0.005" "$PY" -m dvc exp run -S train.lr=0.005

cd "$WORK/flow"
export PREFECT_HOME="$WORK/prefect-home"
timed "distillflow run (cold, no server)" "$PY" -m flows.cli run
timed "distillflow run (all cached, no server)" "$PY" -m flows.cli run
timed "distillflow run -S train.lr=0.005 (no server)" "$PY" -m flows.cli run -S train.lr=0.005

export PREFECT_HOME="$WORK/prefect-server"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start=$(date +%s.%N)
setsid "$PY" -m prefect server start --host 127.0.0.1 --port "$PORT" --no-ui > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill -INT -- -$SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/api/health" > /dev/null; do sleep 0.2; done
printf "%-46s %6.1f s\n" "prefect server start (until healthy)" "$(echo "$(date +%s.%N) - $start" | bc)"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
timed "distillflow run (all cached, server)" "$PY" -m flows.cli run
timed "distillflow run -S train.lr=0.004 (server)" "$PY" -m flows.cli run -S train.lr=0.004
echo "work dir (remove when done): $WORK"
