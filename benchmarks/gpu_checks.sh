#!/usr/bin/env bash
# The GPU checks, as one script: bash benchmarks/gpu_checks.sh [OUT_DIR] [PARTS]
#
# Needs one NVIDIA GPU, torch and transformers; trl, datasets and pydantic, where missing, are
# installed from the wheels in benchmarks/wheels (`make wheels` here; carry that folder). The
# default PARTS (issue 19) fit in TOTAL_BUDGET seconds (540: one 10-minute device call; the
# carried wheels' install, into /tmp/site on PYTHONPATH, counts in it):
#   versions  Python, torch, transformers, trl and the card; the measured bf16 matmul rate.
#             `nvidia-smi dmon -s u` logs SM busy % each second, for every part, to dmon.log
#             (time-stamped, as are checks.log's parts).
#   defaults  sdpo's defaults against TRL's default (reference model in memory), one round.
#   compile   sdpo with --compile (regional torch.compile, compiled before the clock), one round.
#   packed    sdpo with --compile --layout packed, one round.
#   best      the fastest sdpo of defaults/compile/packed (benchmarks.pick_best) against TRL's
#             default, 3 alternating rounds: the figure to quote.
#   profile   the best setting's step under torch.profiler (32 pairs), if time is left.
# Every part runs at the bench shape: the "0.5b" Llama (523M), 384 real pairs (defaults, compile
# and packed on EXPLORE_PAIRS, 192: they only choose the setting), micro-batches of 16, rows of
# at most 512 tokens, PRECISION (bf16-mixed: fp32 weights with bf16 autocast on both sides,
# sdpo's default for a bf16 model; pure: bf16 weights on both sides, as on 2026-11-27).
# Each part has its own limit (VERSIONS_TIMEOUT, DEFAULTS_TIMEOUT, COMPILE_TIMEOUT,
# PACKED_TIMEOUT, BEST_TIMEOUT, PROFILE_TIMEOUT), cut to what is left of TOTAL_BUDGET; until
# "best" has run, BEST_RESERVE seconds of the budget are kept for it. The script exits non-zero
# if a part failed or had no time (the profile excepted).
# Files, in OUT_DIR (default benchmarks/results/gpu): checks.log (every part's output),
# dmon.log, versions.txt, defaults.json, compile.json, packed.json, best.json, profile.json:
# 8, what one device call returns at most.
# Earlier parts, not run by default: bench (sdpo, TRL and TRL with precomputed reference
# log-probs, 2 rounds), layouts, memory (checkpointing on both sides), pipeline (a two-step sDPO
# pipeline on the GPU); see benchmarks/results/gpu/README.md.
#
# DRY_RUN=1 runs the same parts on the CPU with the tiny model and 8 pairs, without nvidia-smi,
# under a CPU's limits (1500 s in all) (tests/benchmarks/test_gpu_checks.py), to try the script
# before spending device time.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
parts=" ${2:-versions defaults compile packed best profile} "
python=${PYTHON:-python3}
dry=${DRY_RUN:-0}
# Limits on a 2-core CPU (the dry run compiles with inductor there: a minute or two a process).
# versions, defaults, compile, packed, best, profile (limits); best's reserve; the whole budget.
if [ "$dry" = 1 ]; then limits=(60 150 300 300 600 200 300 1500); else limits=(45 75 75 75 240 90 240 540); fi
budget=${TOTAL_BUDGET:-${limits[7]}}
wheels=${WHEELS:-benchmarks/wheels}
mkdir -p "$out"
log="$out/checks.log"
: >"$log"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$SECONDS
failed=""

if [ "$dry" = 1 ]; then
    device=cpu
    # Packed rows of 256 tokens: the tiny pairs take at most 192, and the CPU computes the mask densely.
    shape=(--device cpu --dtype bfloat16 --sizes tiny --pairs 8 --batch-size 4 --max-length 96 --max-prompt-length 48
        --row-tokens 256)
    profile_shape=(--device cpu --dtype bfloat16 --size tiny --pairs 8 --batch-size 4 --max-length 96
        --max-prompt-length 48 --row-tokens 256 --profile-pairs 4)
else
    device=cuda
    shape=(--device cuda --dtype bfloat16 --sizes 0.5b --pairs 384 --batch-size 16 --max-length 512 --max-prompt-length 256)
    profile_shape=(--device cuda --dtype bfloat16 --size 0.5b --pairs 384 --batch-size 16 --max-length 512
        --max-prompt-length 256 --profile-pairs 32)
fi
shape+=(--precision "${PRECISION:-bf16-mixed}")
profile_shape+=(--precision "${PRECISION:-bf16-mixed}")
bench=("$python" -m benchmarks.dpo_step "${shape[@]}")
# defaults, compile and packed choose the setting: on fewer pairs (the compiled ones run their step
# twice, once before the clock), all three alike so that pick_best compares them; best runs them all.
if [ "$dry" = 1 ]; then explore=(--pairs 8); else explore=(--pairs "${EXPLORE_PAIRS:-192}"); fi

note() { echo "== $(date -u +%T) $*" | tee -a "$log"; }

# The carried wheels (make wheels), where trl is missing: into a folder of their own on PYTHONPATH,
# as the device machine's notes prescribe (its own environment is left as it is), before any part
# and outside their limits.
if ! "$python" -c 'import trl, datasets, pydantic' 2>/dev/null; then
    site=${SITE:-/tmp/site}
    note "installing the carried wheels from $wheels into $site"
    if timeout "${WHEELS_TIMEOUT:-120}" "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
        --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl 2>&1 | tee -a "$log"; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        failed+=" wheels"
    fi
fi

# part NAME LIMIT COMMAND...: runs COMMAND under the part's limit, cut to the budget left (less
# BEST_RESERVE while "best" is still to run), its output appended to checks.log.
part() {
    local name=$1 limit=$2 left reserve=0 start rc
    shift 2
    left=$((budget - (SECONDS - t0)))
    if [[ $name != best && $parts == *" best "* && -z ${best_done:-} ]]; then
        reserve=${BEST_RESERVE:-${limits[6]}}
    fi
    ((limit > left - reserve)) && limit=$((left - reserve))
    if ((limit < ${MIN_PART:-20})); then
        note "$name: skipped, ${left} s of the budget left"
        [ "$name" = profile ] || failed+=" $name"
        return 0
    fi
    note "$name (at most ${limit} s): $(head -n 1 <<<"$*")"
    start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    note "$name: exit $rc after $((SECONDS - start)) s"
    ((rc == 0)) || failed+=" $name"
}

versions() {
    if [ "$device" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    fi
    "$python" - "$device" <<'EOF'
import platform, sys
import torch, transformers, trl, datasets, pydantic
from benchmarks.dpo_step import matmul_rate
device = sys.argv[1]
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "trl", trl.__version__, "datasets", datasets.__version__, "pydantic", pydantic.__version__)
print("device", torch.cuda.get_device_name() if device == "cuda" else "cpu", "cpus", torch.get_num_threads())
rates = [matmul_rate(device, "bfloat16", 1.0) for _ in range(2)]
print("bf16 matmul rate (TFLOP/s):", ", ".join(f"{r / 1e12:.1f}" for r in rates))
EOF
}

dmon_pid=""
if [ "$device" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi dmon -s u -o T -f "$out/dmon.log" &
    dmon_pid=$!
fi

if [[ $parts == *" versions "* ]]; then
    export python device wheels
    part versions "${VERSIONS_TIMEOUT:-${limits[0]}}" bash -c "$(declare -f versions); versions"
    cp "$log" "$out/versions.txt"
fi
[[ $parts == *" defaults "* ]] &&
    part defaults "${DEFAULTS_TIMEOUT:-${limits[1]}}" "${bench[@]}" "${explore[@]}" --repeats 1 --variants sdpo,trl --out "$out/defaults.json"
[[ $parts == *" compile "* ]] &&
    part compile "${COMPILE_TIMEOUT:-${limits[2]}}" "${bench[@]}" "${explore[@]}" --repeats 1 --variants sdpo --compile --out "$out/compile.json"
[[ $parts == *" packed "* ]] &&
    part packed "${PACKED_TIMEOUT:-${limits[3]}}" "${bench[@]}" "${explore[@]}" --repeats 1 --variants sdpo --compile --layout packed \
        --out "$out/packed.json"
best_flags=()
if [[ $parts == *" best "* || $parts == *" profile "* ]]; then
    read -r -a best_flags <<<"$("$python" -m benchmarks.pick_best "$out/defaults.json" "$out/compile.json" \
        "$out/packed.json" 2> >(tee -a "$log" >&2))"
fi
if [[ $parts == *" best "* ]]; then
    part best "${BEST_TIMEOUT:-${limits[4]}}" "${bench[@]}" --repeats "${BEST_ROUNDS:-3}" --variants sdpo,trl \
        ${best_flags[@]+"${best_flags[@]}"} --out "$out/best.json"
    best_done=1
fi
[[ $parts == *" profile "* ]] &&
    part profile "${PROFILE_TIMEOUT:-${limits[5]}}" "$python" -m benchmarks.profile_step "${profile_shape[@]}" \
        ${best_flags[@]+"${best_flags[@]}"} --top 30 --out "$out/profile.json"

# The parts measured before issue 19 (benchmarks/results/gpu/README.md), on request.
gpu_shape=(--device cuda --dtype bfloat16 --sizes 0.5b --pairs 384 --batch-size 16 --max-length 512 --max-prompt-length 256)
[[ $parts == *" bench "* ]] &&
    part bench "${BENCH_TIMEOUT:-270}" "$python" -m benchmarks.dpo_step "${gpu_shape[@]}" --repeats 2 \
        --variants sdpo,trl,trl_precompute --out "$out/dpo_step_gpu.json"
if [[ $parts == *" layouts "* ]]; then
    part layout_shared_onepass "${EXPLORE_TIMEOUT:-70}" "$python" -m benchmarks.dpo_step "${gpu_shape[@]}" \
        --repeats 1 --variants sdpo --layout shared --pass-tokens -1 --out "$out/layout_shared_onepass.json"
    part layout_padded_4096 "${EXPLORE_TIMEOUT:-70}" "$python" -m benchmarks.dpo_step "${gpu_shape[@]}" \
        --repeats 1 --variants sdpo --layout padded --pass-tokens 4096 --out "$out/layout_padded_4096.json"
fi
[[ $parts == *" memory "* ]] &&
    part memory "${MEMORY_TIMEOUT:-130}" "$python" -m benchmarks.dpo_step "${gpu_shape[@]}" --repeats 1 \
        --variants sdpo,trl --gradient-checkpointing --out "$out/dpo_step_gpu_checkpointing.json"
if [[ $parts == *" pipeline "* ]]; then
    home=$(mktemp -d)
    part pipeline "${PIPELINE_TIMEOUT:-120}" env SDPO_HOME="$home" "$python" -m flows.cli run \
        --config recipes/random.yaml partition.num_steps=2 run_name=gpu-two-steps train.device=cuda
fi

[ -n "$dmon_pid" ] && kill "$dmon_pid" 2>/dev/null
note "done after $((SECONDS - t0)) s;${failed:+ failed or skipped:$failed}"
[ -z "$failed" ]
