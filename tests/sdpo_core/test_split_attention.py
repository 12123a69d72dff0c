"""Split attention (two calls, no (B, 1, T, T) mask) computes what the 4-D mask and two padded rows do.

Pairs of varied prompt/chosen/rejected lengths (length-1 completions, a one-token prompt, rows
that need padding, chosen longer and shorter than rejected) on the shipped tiny model and on
small random Llamas with grouped-query, multi-query and multi-head attention, sdpa and eager.
The fallback to the 4-D mask is taken when the model cannot split (checked before and during
the forward), and split attention leaves the model's config, saved config and generation as
they were.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from sdpo_core import attention, attn_swap
from sdpo_core.attention import SPLIT_ATTENTION
from sdpo_core.logprobs import SharedPromptBatch, TokenizedPair, collate_pairs, collate_shared, completion_logps

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = Path(__file__).resolve().parents[2] / "models" / "stories260K"
PAD = 0
# (prompt, chosen, rejected) lengths.
LENGTHS = [(1, 1, 1), (4, 1, 9), (7, 12, 1), (3, 5, 5), (10, 2, 6), (2, 9, 3)]
# name -> (key/value heads of 4 query heads, attention implementation); None: the shipped model.
MODELS: dict[str, tuple[int, str] | None] = {
    "stories260K": None,  # 8 query heads, 4 key/value heads
    "gqa-sdpa": (2, "sdpa"),
    "mqa-eager": (1, "eager"),
    "mha-sdpa": (4, "sdpa"),
}


TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    # Larger than the default 0.02, so attention is far from uniform and a token seen or not matters.
    initializer_range=0.2,
)
"""The random models' sizes (also fsdp_fallback_worker.py's)."""


def build(name: str) -> LlamaForCausalLM:
    spec = MODELS[name]
    if spec is None:
        return LlamaForCausalLM.from_pretrained(MODEL, use_safetensors=True)
    kv_heads, implementation = spec
    config = LlamaConfig(**TINY_LLAMA, num_key_value_heads=kv_heads, attn_implementation=implementation)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def make_pairs(lengths: list[tuple[int, int, int]], seed: int = 0) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 256, (n,), generator=gen).tolist()  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in lengths]


PAIRS = make_pairs(LENGTHS)


@pytest.fixture
def split_runs(monkeypatch) -> list[int]:
    """The attention calls of each forward that took split attention, in order."""
    calls: list[int] = []
    original = attention.completed

    def spy(run, decoder):
        calls.append(run.calls)
        return original(run, decoder)

    monkeypatch.setattr(attention, "completed", spy)
    return calls


def force_mask(monkeypatch) -> None:
    monkeypatch.setattr(attention, "refusal", lambda decoder, width: "forced by the test")


def logps_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs, token counts and d(mean completion log-prob)/d(params) (O(1) entries)."""
    model.zero_grad(set_to_none=True)
    logps, tokens = completion_logps(model, batch, chunk_rows=16)
    (logps.sum() / tokens.sum()).backward()
    return logps.detach(), tokens, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_layout_indexes_are_the_two_sequences() -> None:
    """The gather indexes, the rejected queries' mask and the output indexes worked out by hand.

    Row 0: P=2, C=3, R=1 (width 6); row 1: P=1, C=1, R=4 (width 6). A = max(P + C) = 5,
    L = max(P + R) = 5, M = max R = 4. Keys and values: row 0 gathers columns 0 1 | 5 and pads,
    row 1 gathers 0 | 2 3 4 5. Queries: row 0's rejected token is column 5, row 1's are 2..5.
    Rejected query j sees gathered keys 0 .. P + j. Outputs: row 0 reads 0..4 from the prefix
    call and column 5 from rejected query 0 (5 + 0); row 1 reads 0 1 from the prefix call and
    columns 2..5 from rejected queries 0..3 (5..8).
    """
    batch = collate_shared(make_pairs([(2, 3, 1), (1, 1, 4)]), PAD)
    s = batch.split
    assert s.prefix_width == 5
    assert s.rejected_index.tolist() == [[0, 1, 5, 0, 0], [0, 2, 3, 4, 5]]
    assert s.query_index.tolist() == [[5, 0, 0, 0], [2, 3, 4, 5]]
    assert s.query_slot.tolist() == [[2, 0, 0, 0], [1, 2, 3, 4]]
    sees = lambda p: [[int(k <= p + j) for k in range(5)] for j in range(4)]  # noqa: E731
    assert s.rejected_mask.int().tolist() == [[sees(2)], [sees(1)]]
    assert s.output_index.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 5, 6, 7, 8]]
    # The gathered positions are 0, 1, 2, ... within prompt + rejected, as RoPE needs.
    positions = batch.position_ids.gather(1, s.rejected_index)
    assert positions.tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]


def test_the_mask_worked_out_by_hand() -> None:
    """Row 0 of the example above (P=2, C=3, R=1, no padding) and row 1 padded by one column.

    Causal, except that the rejected query (column 5 of row 0) does not see chosen keys 2..4;
    row 1 (P=1, C=1, R=2, width 4 of 6) attends causally on its padding columns 4 and 5.
    """
    batch = collate_shared(make_pairs([(2, 3, 1), (1, 1, 2)]), PAD)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    row0, row1 = causal.clone(), causal.clone()
    row0[5, 2:5] = False
    row1[2:4, 1] = False  # rejected queries 2, 3 do not see chosen key 1
    assert batch.attention_mask.shape == (2, 1, 6, 6)
    assert torch.equal(batch.attention_mask[:, 0], torch.stack([row0, row1]))


def test_split_attention_never_builds_the_mask(monkeypatch, split_runs) -> None:
    """The (B, 1, T, T) mask is made only for the mask path, not for every pass."""
    built: list[int] = []
    original = SharedPromptBatch.attention_mask

    def counted(batch):
        built.append(batch.input_ids.shape[1])
        return original.fget(batch)

    monkeypatch.setattr(SharedPromptBatch, "attention_mask", property(counted))
    model = build(next(iter(MODELS))).train()
    logps_and_grads(model, collate_shared(PAIRS, PAD))
    assert split_runs and not built
    force_mask(monkeypatch)
    logps_and_grads(model, collate_shared(PAIRS, PAD))
    assert len(built) == 1


@pytest.mark.parametrize("second_call", ["rectangle", "square"])
@pytest.mark.parametrize("name", list(MODELS))
def test_split_attention_equals_the_mask_and_padded_rows(name, second_call, monkeypatch, split_runs) -> None:
    """Log-probs and parameter gradients agree across the three ways of computing them.

    Both shapes of the second call: the rejected queries alone (CPUs) and a square causal call
    over prompt + rejected (GPUs), both run here on the CPU. In training mode: the dropout of
    these models is 0, so training splits too.
    """
    monkeypatch.setattr(attention, "RECTANGLE_DEVICES", ("cpu",) if second_call == "rectangle" else ())
    model = build(name).train()
    split = logps_and_grads(model, collate_shared(PAIRS, PAD))
    assert split_runs == [model.config.num_hidden_layers], "the shared layout should split every layer"
    padded = logps_and_grads(model, collate_pairs(PAIRS, PAD))
    with monkeypatch.context() as m:
        force_mask(m)
        masked = logps_and_grads(model, collate_shared(PAIRS, PAD))
    assert len(split_runs) == 1
    assert split[1].tolist() == [c for _, c, _ in LENGTHS] + [r for _, _, r in LENGTHS]
    for other in (masked, padded):
        assert_close(split[0], other[0], atol=2e-5, rtol=1e-5)
        assert torch.equal(split[1], other[1])
        for param, grad in other[2].items():
            assert_close(split[2][param], grad, atol=2e-5, rtol=1e-4, msg=param)
    assert all(g.abs().max() > 1e-4 for g in split[2].values()), "every parameter should get a gradient"


def test_a_layout_moved_off_the_rectangle_devices_drops_its_mask(monkeypatch) -> None:
    """A GPU's square call needs no rejected mask, so moving the layout there does not copy it;
    a layout without one takes the square call even on a CPU, and gives the same log-probs."""
    batch = collate_shared(PAIRS, PAD)
    assert batch.split.to("cpu").rejected_mask is not None
    moved = batch.split.to("meta")  # stands in for a GPU: not in RECTANGLE_DEVICES
    assert moved.rejected_mask is None
    assert moved.query_slot.device.type == "meta" and moved.output_index.device.type == "meta"
    model = build("gqa-sdpa").eval()
    with torch.no_grad():
        rectangle, _ = completion_logps(model, batch)
        monkeypatch.setattr(attention, "RECTANGLE_DEVICES", ())
        without_mask = dataclasses.replace(batch, split=batch.split.to("cpu"))
        assert without_mask.split.rejected_mask is None
        square, _ = completion_logps(model, without_mask)
        monkeypatch.setattr(attention, "RECTANGLE_DEVICES", ("cpu",))
        guarded, _ = completion_logps(model, without_mask)  # a CPU, but no mask: the square call
    assert_close(square, rectangle, atol=2e-5, rtol=1e-5)
    assert_close(guarded, rectangle, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("wrong", ["gather", "mask", "slot", "output"])
def test_a_wrong_gather_mask_or_output_index_changes_the_rejected_logps(wrong, monkeypatch) -> None:
    """The equality above bites: prompt + rejected gathered from the wrong columns, rejected
    queries seeing later tokens, the square call read at the wrong slots, or rejected outputs
    read from the prefix call (where they saw the chosen tokens), change the rejected log-probs
    and leave the chosen ones."""
    model = build("gqa-sdpa").eval()
    batch = collate_shared(PAIRS, PAD)
    s = batch.split
    b, t = s.output_index.shape
    if wrong == "gather":  # the row's first L columns: prompt + chosen (+ rejected)
        bad = dataclasses.replace(s, rejected_index=torch.arange(s.rejected_index.shape[1]).expand(b, -1))
    elif wrong == "mask":  # rejected queries see every gathered key, their own future included
        bad = dataclasses.replace(s, rejected_mask=torch.ones_like(s.rejected_mask))
    elif wrong == "slot":  # the square call's outputs read one slot late (GPU shape)
        monkeypatch.setattr(attention, "RECTANGLE_DEVICES", ())
        bad = dataclasses.replace(s, query_slot=(s.query_slot + 1).clamp(max=s.rejected_index.shape[1] - 1))
    else:
        bad = dataclasses.replace(s, output_index=torch.arange(t).clamp(max=s.prefix_width - 1).expand(b, -1))
    with torch.no_grad():
        good, _ = completion_logps(model, batch)
        broken, _ = completion_logps(model, dataclasses.replace(batch, split=bad))
    n = len(PAIRS)
    assert_close(broken[:n], good[:n])
    assert (broken[n:] - good[n:]).abs().max() > 1e-1


def _set(model, attr, value) -> None:
    setattr(model.config, attr, value)


# Each: what to change in a random GQA model, and a word of the reason it must give.
def _checkpointing(model, on: bool) -> None:
    """transformers' own activation checkpointing on or off (no replay), by either name: 5.24's
    activation_checkpointing_* or 5.17's gradient_checkpointing_* (the GPU machine's)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if on else 'disable'}")()


FALLBACKS = {
    "sliding window": (lambda m: _set(m, "sliding_window", 4), "sliding_window"),
    "chunked attention": (lambda m: _set(m, "attention_chunk_size", 4), "attention_chunk_size"),
    "logit softcapping": (lambda m: _set(m, "attn_logit_softcapping", 30.0), "softcapping"),
    "chunked layers": (lambda m: _set(m, "layer_types", ["chunked_attention", "full_attention"]), "full or sliding"),
    "not causal": (lambda m: _set(m, "is_causal", False), "not causal"),
    "flex attention": (lambda m: _set(m, "_attn_implementation_internal", "flex_attention"), "flex_attention"),
    "dropout while training": (lambda m: (_set(m, "attention_dropout", 0.1), m.train()), "dropout"),
    "gradient checkpointing": (lambda m: (_checkpointing(m, True), m.train()), "gradient checkpointing"),
    "attention sinks": (
        lambda m: setattr(m.model.layers[1].self_attn, "sinks", torch.nn.Parameter(torch.zeros(4))),
        "sinks",
    ),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_the_mask_is_kept_when_the_model_cannot_split(case, split_runs) -> None:
    model = build("gqa-sdpa").eval()
    width = collate_shared(PAIRS, PAD).input_ids.shape[1]
    assert attention.refusal(model.model, width) is None
    change, word = FALLBACKS[case]
    change(model)
    reason = attention.refusal(model.model, width)
    assert reason is not None and word in reason
    if case in ("flex attention", "not causal"):
        return  # a forward would use flex attention or no causal mask at all: not this test's business
    batch = collate_shared(PAIRS, PAD)
    logps, tokens = completion_logps(model, batch)
    assert split_runs == []
    assert tokens.tolist() == [c for _, c, _ in LENGTHS] + [r for _, _, r in LENGTHS]
    if case == "gradient checkpointing":
        # The backward pass recomputes the layers: still the padded rows' gradients.
        (logps.sum() / tokens.sum()).backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        _checkpointing(model, False)
        expected = logps_and_grads(model, collate_pairs(PAIRS, PAD))
        assert_close(logps.detach(), expected[0], atol=2e-5, rtol=1e-5)
        for param, grad in expected[2].items():
            assert_close(got[param], grad, atol=2e-5, rtol=1e-4, msg=param)


def test_a_sliding_window_as_wide_as_the_rows_still_splits() -> None:
    """A window of at least the row width restricts nothing (Mistral's 4096 on short rows)."""
    model = build("gqa-sdpa").eval()
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = 30
    assert attention.refusal(model.model, 30) is None
    assert "sliding_window=30 < 31" in attention.refusal(model.model, 31)


def test_modules_outside_the_attention_interface_keep_the_mask() -> None:
    assert "AttentionInterface" in attention.refusal(torch.nn.Linear(2, 2), 8)


@pytest.mark.parametrize("case", ["a layer is not causal", "fewer calls than layers"])
def test_a_forward_that_cannot_split_is_redone_with_the_mask(case, monkeypatch, split_runs) -> None:
    """Problems seen only during the forward: it is recomputed with the mask, with a warning, and
    the model is not split again."""
    model = build("gqa-sdpa").eval()
    if case == "a layer is not causal":
        model.model.layers[1].self_attn.is_causal = False  # only the mask path stays right
    else:
        model.config.num_hidden_layers = 3  # as if a third layer attended some other way
    batch = collate_shared(PAIRS, PAD)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="fall back to a 4-D attention mask"):
            got, _ = completion_logps(model, batch)
        again, _ = completion_logps(model, batch)
        with monkeypatch.context() as m:
            force_mask(m)
            expected, _ = completion_logps(model, batch)
    assert len(split_runs) == 1, "tried once, then remembered"
    assert attention.refusal(model.model, batch.input_ids.shape[1]) is not None
    assert_close(got, expected)
    assert_close(again, expected)


def test_the_config_saved_and_generation_are_untouched(tmp_path, split_runs) -> None:
    model = build("stories260K").eval()
    prompt = torch.tensor([PAIRS[4].prompt_ids]) % model.config.vocab_size
    before = model.generate(prompt, max_new_tokens=8, do_sample=False)
    model.save_pretrained(tmp_path / "before")
    model.train()
    logps, tokens = completion_logps(model, collate_shared(PAIRS, PAD))
    (logps.sum() / tokens.sum()).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    assert split_runs == [model.config.num_hidden_layers]
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path / "after")
    saved = (tmp_path / "after" / "config.json").read_text()
    assert SPLIT_ATTENTION not in saved
    assert json.loads(saved) == json.loads((tmp_path / "before" / "config.json").read_text())
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), before)


def test_the_config_is_restored_when_the_forward_fails() -> None:
    model = build("gqa-sdpa").eval()
    batch = collate_shared(make_pairs([(2, 2, 2)]), PAD)
    bad = dataclasses.replace(batch, input_ids=batch.input_ids + 10_000)  # out of the vocabulary
    with pytest.raises(IndexError):
        completion_logps(model, bad)
    assert model.config._attn_implementation == "sdpa"


def test_concurrent_forwards_restore_the_config_once() -> None:
    """Another thread's split forward is in progress: a plain forward here fails loudly (it would
    otherwise attend without a mask), an sdpo forward here is right, and the config is restored
    when the last one ends."""
    model = build("gqa-sdpa").eval()
    batch = collate_shared(PAIRS, PAD)
    with torch.no_grad():
        expected, _ = completion_logps(model, batch)
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with attention.split_attention(model.model, batch.split):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="outside sdpo's forward"):
                model(input_ids=batch.input_ids)
            got, _ = completion_logps(model, batch)
        assert model.config._attn_implementation == SPLIT_ATTENTION  # the other thread's forward goes on
    finally:
        leave.set()
        thread.join()
    assert model.config._attn_implementation == "sdpa"
    assert_close(got, expected)


def run_fsdp_worker(out: Path, scenario: str) -> dict[int, dict]:
    import subprocess
    import sys

    worker = Path(__file__).with_name("fsdp_fallback_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out)]
    proc = subprocess.run([*cmd, scenario], capture_output=True, text=True, timeout=300, cwd=MODEL.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for got in results.values():
        for key in ("logps", "again"):
            assert_close(torch.tensor(got[key]), torch.tensor(got["expected"]), rtol=1e-5, atol=1e-5)
        assert got["grad_error"] < 1e-4 * got["grad_scale"], got
    return results


@pytest.mark.slow
def test_an_fsdp_fallback_on_one_process_is_taken_by_all(tmp_path) -> None:
    """Under FSDP each forward gathers parameters: when split attention fails on one process only,
    all redo the pass with the mask, so their collectives stay paired (else a hang or a timeout)."""
    results = run_fsdp_worker(tmp_path, "injected")
    assert "injected on rank 1" in results[1]["refusal"]
    assert "another process" in results[0]["refusal"]


@pytest.mark.slow
def test_under_fsdp_a_sliding_window_is_judged_by_the_widest_rows_of_any_process(tmp_path) -> None:
    """A window narrower than rank 0's rows (22 columns) but not rank 1's (5): both take the mask
    for that pass, and rank 1 is not refused for good (rows narrower than the window still split)."""
    results = run_fsdp_worker(tmp_path, "window")
    assert "sliding_window=12 < 22" in results[0]["refusal"]
    assert results[1]["refusal"] is None


@pytest.mark.slow
def test_under_fsdp_checkpointed_layers_split_attention_and_match_gradients(tmp_path) -> None:
    """Activation checkpointing under FSDP: the recomputed layers replay split attention, every
    forward splits, and the gradients equal an unsharded model's with the mask."""
    results = run_fsdp_worker(tmp_path, "checkpointing")
    for got in results.values():
        assert got["refusal"] is None
        assert got["split_forwards"] == 2


def test_checkpointed_layers_replay_split_attention_in_every_backward() -> None:
    """A graph kept with retain_graph is recomputed once per backward: each recomputation gets
    the forward's layout again, and the gradients equal those without checkpointing."""
    from sdpo_core.train import disable_activation_checkpointing, enable_activation_checkpointing

    model = build("gqa-sdpa").train()
    batch = collate_shared(PAIRS, PAD)
    _, _, plain = logps_and_grads(model, batch)
    enable_activation_checkpointing(model)
    logps, tokens = completion_logps(model, batch, chunk_rows=16)
    loss = logps.sum() / tokens.sum()
    grads = []
    for keep in (True, False):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=keep)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    disable_activation_checkpointing(model)
    for name, grad in plain.items():
        for got in grads:
            assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert model.config._attn_implementation == "sdpa"
    assert not attn_swap._SWAPPED
    assert not getattr(model, "_require_grads_hooks", None), "the embeddings' hook is removed"
