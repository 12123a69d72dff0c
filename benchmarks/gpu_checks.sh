#!/usr/bin/env bash
# The GPU checks, as one script: bash benchmarks/gpu_checks.sh [OUT_DIR] [PARTS]
#
# Needs one NVIDIA GPU and this project's dependencies plus trl (pip install -e ".[test]").
# PARTS (default "bench profile", about 420 s at most: one 10-minute device call):
#   bench     The DPO step benchmark in bf16 on a ~0.5B Llama: sdpo against TRL's DPOTrainer with
#             its reference model in memory (its default) and with precomputed reference
#             log-probs, two alternating rounds, MFU against the card's measured bf16 rate.
#   profile   sdpo's step at the bench shape run cold, then warm, then 64 pairs under
#             torch.profiler: what the cold start costs and which operations take the time
#             (at most 150 s).
#   layouts   sdpo alone with the shared-prompt layout (split attention) in one pass, and padded
#             rows in 4096-token passes: what the GPU defaults are chosen from (run on
#             2026-11-27, benchmarks/results/gpu).
#   memory    sdpo against TRL's default, both with activation checkpointing (the memory lever
#             that both have), one round (run on 2026-11-27).
#   pipeline  A two-step sDPO pipeline (the random-split recipe, tiny model) with its train steps
#             on the GPU: Prefect's temporary server, MLflow on SQLite, every step registered
#             (about 75 s; run on 2026-11-27).
# Everything goes to OUT_DIR (default benchmarks/results/gpu): JSON, logs, the card's name; 5
# files for the default parts. A device call returns at most 8 files: "layouts memory" with
# "bench" makes 8.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
parts=" ${2:-bench profile} "
python=${PYTHON:-python3}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

bench_rc=0 pipeline_rc=0 explore_rc=0 memory_rc=0 profile_rc=0
shape=(--device cuda --dtype bfloat16 --sizes 0.5b --pairs 384 --batch-size 16 --max-length 512 --max-prompt-length 256)

if [[ $parts == *" bench "* ]]; then
    start=$SECONDS
    timeout "${BENCH_TIMEOUT:-270}" "$python" -m benchmarks.dpo_step "${shape[@]}" \
        --repeats 2 --variants sdpo,trl,trl_precompute --out "$out/dpo_step_gpu.json" 2>&1 | tee "$out/bench.log"
    bench_rc=${PIPESTATUS[0]}
    echo "benchmark: exit $bench_rc after $((SECONDS - start)) s"
fi

# What the defaults are chosen from, on the same card: the shared-prompt layout (split
# attention) against padded rows, and smaller passes for memory. One round each, sdpo only.
if [[ $parts == *" layouts "* ]]; then
    start=$SECONDS
    for run in "shared_onepass:shared -1" "padded_4096:padded 4096"; do
        name=${run%%:*}
        read -r -a settings <<<"${run#*:}"
        timeout "${EXPLORE_TIMEOUT:-70}" "$python" -m benchmarks.dpo_step "${shape[@]}" --repeats 1 --variants sdpo \
            --layout "${settings[0]}" --pass-tokens "${settings[1]}" --out "$out/layout_$name.json" 2>&1 |
            tee -a "$out/explore.log"
        [ "${PIPESTATUS[0]}" = 0 ] || explore_rc=1
    done
    echo "layouts: exit $explore_rc after $((SECONDS - start)) s"
fi

if [[ $parts == *" memory "* ]]; then
    start=$SECONDS
    timeout "${MEMORY_TIMEOUT:-130}" "$python" -m benchmarks.dpo_step "${shape[@]}" --repeats 1 --variants sdpo,trl \
        --gradient-checkpointing --out "$out/dpo_step_gpu_checkpointing.json" 2>&1 | tee "$out/memory.log"
    memory_rc=${PIPESTATUS[0]}
    echo "memory: exit $memory_rc after $((SECONDS - start)) s"
fi

if [[ $parts == *" profile "* ]]; then
    start=$SECONDS
    timeout "${PROFILE_TIMEOUT:-150}" "$python" -m benchmarks.profile_step --device cuda --dtype bfloat16 --size 0.5b \
        --pairs 384 --batch-size 16 --max-length 512 --max-prompt-length 256 --top 40 \
        --out "$out/profile_step_gpu.json" 2>&1 | tee "$out/profile.log"
    profile_rc=${PIPESTATUS[0]}
    echo "profile: exit $profile_rc after $((SECONDS - start)) s"
fi

if [[ $parts == *" pipeline "* ]]; then
    start=$SECONDS
    home=$(mktemp -d)
    SDPO_HOME=$home timeout "${PIPELINE_TIMEOUT:-120}" "$python" -m flows.cli run --config recipes/random.yaml \
        partition.num_steps=2 run_name=gpu-two-steps train.device=cuda 2>&1 | tee "$out/pipeline.log"
    pipeline_rc=${PIPESTATUS[0]}
    echo "pipeline: exit $pipeline_rc after $((SECONDS - start)) s" | tee -a "$out/pipeline.log"
fi

exit $((bench_rc || explore_rc || memory_rc || profile_rc || pipeline_rc))
