#!/usr/bin/env bash
# The flow's overhead (README, "Running under Prefect"): on a checkout whose pipeline is
# already reproduced, an all-cached `dvc repro` beside an all-cached `distillflow run`
# and Prefect's bare start-up (a flow with no tasks), measured in one go:
#
#   dvc repro (all cached)                   DVC's own "up to date" check
#   prefect: an empty flow                   imports + Prefect start-up + one flow run, nothing else
#   distillflow run (dvc.lock up to date)    first flow run: no Prefect cache records yet, every
#                                            stage found up to date in dvc.lock
#   distillflow run (all cached)             every stage a Prefect cache hit
#
# each with no server (Prefect starts a temporary one per process) and, with
# WITH_SERVER=1, against a running `prefect server start` too. The flow code measured
# is REPO's own flows/ (`python -m distillflow.cli` run in REPO).
#
#   bash benchmarks/flow_timings.sh REPO     # REPO: a checkout `dvc repro` has run (dvc status clean)
#   bash benchmarks/flow_timings.sh          # first makes one: this checkout on the smoke profile in a
#                                            # temporary folder, `dvc repro` cold (a few minutes on 2 cores)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WORK=$(mktemp -d)
export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180  # a loaded machine starts the temporary server slowly
export PATH="$(dirname "$(command -v "$PY")"):$PATH"
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@localhost GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@localhost
unset PREFECT_API_URL

timed() {  # label command...: wall time, CPU time (its processes, user+sys), load average, distillflow's breakdown
  local label=$1; shift
  local start end
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$WORK/cpu" "$@" > "$WORK/out.log" 2>&1 || { cat "$WORK/out.log"; exit 1; }
  end=$(date +%s.%N)
  printf "%-52s %6.1f s wall %6.1f s cpu   (load %s)\n" "$label" "$(echo "$end - $start" | bc)" \
    "$(awk '{print $1 + $2}' "$WORK/cpu")" "$(cut -d' ' -f1 /proc/loadavg)"
  grep -E "^flow run " "$WORK/out.log" | sed 's/^/    /' || true
}
BARE_FLOW='from prefect import flow
flow(name="bare")(lambda: None)()'  # Prefect alone: import it, start up, run one flow with no tasks

if [ $# -ge 1 ]; then
  REPO=$(cd "$1" && pwd)
else
  REPO="$WORK/repo"
  mkdir -p "$REPO"
  (cd "$ROOT" && git ls-files --cached --others --exclude-standard | grep -v -E '^(data/|metrics/|plots/|dvc.lock$)' |
     while read -r f; do [ -f "$f" ] && mkdir -p "$REPO/$(dirname "$f")" && cp -p "$f" "$REPO/$f"; done)
  cp "$ROOT/profiles/smoke.yaml" "$REPO/params.yaml"
  (cd "$REPO" && git init -q && git add -A && git commit -qm smoke)
  cd "$REPO"
  timed "dvc repro (cold, smoke profile)" "$PY" -m dvc repro
fi
cd "$REPO"
"$PY" -m dvc status | grep "Data and pipelines are up to date" > /dev/null || { echo "$REPO: dvc status is not clean; run dvc repro first" >&2; exit 1; }
echo "repo: $REPO ($("$PY" -m dvc dag --dot | grep -c '^"[^"]*";$') stages)"
# A fresh Prefect home: no cache records yet, so the first flow run finds every stage up to date in dvc.lock.
rm -rf "$REPO/.dvc/tmp/distillflow-prefect"
export PREFECT_HOME="$WORK/prefect-home"
timed "dvc repro (all cached)" "$PY" -m dvc repro
timed "prefect: an empty flow (no server)" "$PY" -c "$BARE_FLOW"
timed "distillflow run (dvc.lock up to date, no server)" "$PY" -m distillflow.cli run
timed "distillflow run (all cached, no server)" "$PY" -m distillflow.cli run

if [ "${WITH_SERVER:-0}" = 1 ]; then
  export PREFECT_HOME="$WORK/prefect-server"
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  start=$(date +%s.%N)
  setsid "$PY" -m prefect server start --host 127.0.0.1 --port "$PORT" --no-ui > "$WORK/server.log" 2>&1 &
  SERVER=$!
  trap 'kill -INT -- -$SERVER 2>/dev/null || true' EXIT
  until curl -sf "http://127.0.0.1:$PORT/api/health" > /dev/null; do sleep 0.2; done
  printf "%-52s %6.1f s\n" "prefect server start (until healthy)" "$(echo "$(date +%s.%N) - $start" | bc)"
  export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
  timed "prefect: an empty flow (server)" "$PY" -c "$BARE_FLOW"
  timed "distillflow run (all cached, server)" "$PY" -m distillflow.cli run
fi
"$PY" -m dvc status | grep "Data and pipelines are up to date" > /dev/null || { echo "dvc status is not clean after the runs" >&2; exit 1; }
echo "work dir (remove when done): $WORK"
