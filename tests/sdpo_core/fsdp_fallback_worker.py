"""Two gloo processes under FSDP whose ranks could disagree about split attention.

Run by ``test_split_attention.py`` as
``python -m torch.distributed.run --standalone --nproc_per_node=2 <this file> OUT SCENARIO``:

- ``injected``: split attention fails on rank 1 only, during the forward;
- ``window``: a sliding window narrower than rank 0's rows but wider than rank 1's;
- ``checkpointing``: nothing fails, and the layers are checkpointed (recomputed in the backward).

Each rank writes ``OUT/rank<r>.json``: its policy log-probs from the FSDP module over two passes
(forward and backward), the same log-probs computed with the 4-D mask on an unsharded copy, and
whether its decoder refuses split attention for its own rows afterwards, how many forwards split
attention, and how far the first pass's gradients (gathered whole) are from those of an
unsharded copy without checkpointing over both ranks' pairs.
"""

from __future__ import annotations

import copy
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
from test_split_attention import TINY_LLAMA  # run as a script, this folder is first on sys.path
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from sdpo_core import attention, parallel
from sdpo_core.logprobs import TokenizedPair, collate_shared, completion_logps
from sdpo_core.train import enable_activation_checkpointing

SIZES = {**TINY_LLAMA, "num_key_value_heads": 2, "attn_implementation": "sdpa"}
# (P, C, R) of each rank's pairs: rows of 22 and 16 columns on rank 0, of 5 on rank 1.
LENGTHS = {0: [(5, 8, 9), (3, 6, 7)], 1: [(1, 2, 2), (2, 1, 2)]}


def batch_of(rank: int):
    gen = torch.Generator().manual_seed(10 + rank)
    ids = lambda n: torch.randint(3, 256, (n,), generator=gen).tolist()  # noqa: E731
    return collate_shared([TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in LENGTHS[rank]], 0)


def main(out: Path, scenario: str) -> None:
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)  # the same weights on both ranks
    if scenario == "window":
        model = MistralForCausalLM(MistralConfig(sliding_window=12, **SIZES))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SIZES))
    model.train()
    batches = [batch_of(r) for r in (0, 1)]  # each rank its own pairs
    batch = batches[rank]

    # The reference: an unsharded copy with the 4-D mask. FSDP averages the gradients over the
    # ranks, so the expected gradient is the mean over both ranks' pairs.
    reference = copy.deepcopy(model)
    attention.refuse(reference.model, "reference: the 4-D mask")
    for b in batches:
        completion_logps(reference, b)[0].sum().backward()
    expected_grads = {name: p.grad / 2 for name, p in reference.named_parameters()}
    with torch.no_grad():
        expected, _ = completion_logps(reference, batch)

    if scenario == "injected" and rank == 1:
        original = attention._call_problem
        attention._call_problem = lambda *a: "injected on rank 1" if a[0] is not None else original(*a)
    if scenario == "checkpointing":
        enable_activation_checkpointing(model)
    split_forwards = []
    completed = attention.completed
    attention.completed = lambda run, decoder: split_forwards.append(1) or completed(run, decoder)
    module = parallel.wrap(model, 16, "fsdp", 2, torch.device("cpu"))
    logps, _ = module(batch)
    logps.sum().backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    grad_error = max((grads[name] - g).abs().max().item() for name, g in expected_grads.items())
    again, _ = module(batch)  # a second pass: the ranks must still pair their collectives
    again.sum().backward()
    result = {
        "logps": logps.tolist(),
        "again": again.tolist(),
        "expected": expected.tolist(),
        "refusal": attention.refusal(model.model, batch.input_ids.shape[1]),
        "split_forwards": len(split_forwards),
        "grad_error": grad_error,
        "grad_scale": max(g.abs().max().item() for g in expected_grads.values()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
