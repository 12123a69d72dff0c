"""Where sdpo's DPO step spends its time: the benchmark's step, run three times in one process.

    python -m benchmarks.profile_step --device cuda --dtype bfloat16 --size 0.5b --pairs 384 \
        --batch-size 16 --max-length 512 --max-prompt-length 256

The first run pays what happens once per process (kernel selection, the allocator growing to
its peak, compilation under ``--compile``), as the benchmark's warm-up does; the second, on the same pairs, shows the steady
state. The third runs on the first ``--profile-pairs`` pairs only, under torch.profiler (a
trace of the whole step takes minutes to summarise on a GPU). Prints the wall times as they
come and the operations that took the most time, as JSON (``--out``) and a table. The model,
pairs and settings are :mod:`benchmarks.dpo_step`'s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.dpo_step import (
    PAD_ID,
    add_step_options,
    build_model,
    compile_counts,
    precision_of,
    real_pairs,
    run_sdpo,
    sdpo_configs,
    warm_up,
    weights_dtype,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="tiny, 20m or 0.5b")
    add_step_options(parser)
    parser.add_argument("--profile-pairs", type=int, default=64, help="pairs of the profiled run")
    parser.add_argument("--top", type=int, default=25, help="operations listed")
    parser.add_argument("--out", default="benchmarks/results/profile_step.json")
    args = parser.parse_args(argv)
    if args.precision == "bf16-mixed" and args.dtype != "bfloat16":
        parser.error(f"--precision bf16-mixed computes in bfloat16: pass --dtype bfloat16, not {args.dtype}")
    result = profile(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"profiled run ({result['profiled_pairs']} pairs): {result['profiled_run_s']:.2f} s")
    print(f"{'operation':<48} {'calls':>7} {'device ms':>10} {'cpu ms':>10}")
    for op in result["top"]:
        print(f"{op['name'][:48]:<48} {op['calls']:>7} {op['device_ms']:>10.1f} {op['cpu_ms']:>10.1f}")
    print(f"JSON: {args.out}")
    return 0


def profile(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity

    on_gpu = args.device.startswith("cuda")
    model = build_model(args.size, getattr(torch, weights_dtype(args)), args.device)
    pairs = real_pairs(args.pairs, args.max_length, args.max_prompt_length, model.config.vocab_size)
    train_cfg, loss_cfg = sdpo_configs(args)
    warm_up(model, pairs, PAD_ID, args.device, precision=precision_of(args))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def timed(chosen: list[Any]) -> float:
        model.load_state_dict(state)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_sdpo(model, chosen, PAD_ID, args, train_cfg, loss_cfg)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    runs = {}
    for name in ("first_run_s", "second_run_s"):
        runs[name] = timed(pairs)
        print(f"{name}: {runs[name]:.2f} s ({len(pairs)} pairs)", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    profiled = pairs[: args.profile_pairs]
    before = compile_counts()
    with torch.profiler.profile(activities=activities) as prof:
        runs["profiled_run_s"] = timed(profiled)
    after = compile_counts()
    # Operations only: the kernels they launch are listed too, and their time is already each
    # operation's self device time (summing both would count the GPU's time twice).
    ops = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    ops.sort(key=lambda e: getattr(e, key), reverse=True)
    top = [
        {
            "name": e.key,
            "calls": e.count,
            "device_ms": e.self_device_time_total / 1e3 if on_gpu else 0.0,
            "cpu_ms": e.self_cpu_time_total / 1e3,
        }
        for e in ops[: args.top]
    ]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "top")}
    return {
        "command": "python -m benchmarks.profile_step "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if not isinstance(v, bool))
        + "".join(f" --{k.replace('_', '-')}" for k, v in settings.items() if v is True),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "layout": {"shared_prompt": train_cfg.shared_prompt, "max_pass_tokens": train_cfg.max_pass_tokens},
        "compile": train_cfg.compile,
        # The profiled pairs form other micro-batches than the whole run's: under --compile a new
        # padded width compiles inside the profile (-1: not counted).
        "graphs_in_profiled_run": after["graphs"] - before["graphs"] if before and after else -1,
        "precision": args.precision,
        **runs,
        "profiled_pairs": len(profiled),
        "total_ms": sum(getattr(e, key) for e in ops) / 1e3,
        "top": top,
    }


if __name__ == "__main__":
    raise SystemExit(main())
