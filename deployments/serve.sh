#!/usr/bin/env bash
# Start a Prefect server, create the work pools, register the S3 credentials block type and the
# deployments, and serve both pools with process workers. Needs PREFECT_API_URL, PREFECT_HOME and
# SDPO_PROJECT_DIR (make serve).
set -euo pipefail
cd "$SDPO_PROJECT_DIR"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# On a fresh clone the workspace does not exist yet, and the server cannot create its SQLite
# database under a missing folder ("unable to open database file").
mkdir -p "$PREFECT_HOME"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
# The server listens on PREFECT_API_URL's port (make serve: 4200).
port="${PREFECT_API_URL##*:}"
port="${port%%/*}"
prefect server start --host 127.0.0.1 --port "$port" & pids+=($!)
for _ in $(seq 1 180); do  # a cold start takes ~15 s, longer on a busy machine
  curl -fs "$PREFECT_API_URL/health" >/dev/null && break
  sleep 1
done
for pool in cpu-pool gpu-pool; do
  prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
done
# The S3 credentials block type (storage.credentials_block), so the UI can create such blocks.
prefect block register -m tasks.blocks
prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
prefect worker start --pool cpu-pool & pids+=($!)
prefect worker start --pool gpu-pool & pids+=($!)
echo "Prefect UI: http://127.0.0.1:$port (deployments sdpo_pipeline/sdpo-pipeline, sdpo_train_step/sdpo-train-step)"
echo "Schedules are off; turn the nightly pipeline on with: make schedule-on DEPLOYMENT=sdpo_pipeline/sdpo-pipeline"
wait
