"""Regional compilation of the decoder layers (sdpo_core.compiling) on the shipped tiny Llama.

Compiled log-probs and gradients equal eager ones, the compiled region has no graph break, the
layers are plain again after the block, and bucketed widths compile a bounded number of graphs.
Most tests use torch.compile's "aot_eager" backend (dynamo's and AOTAutograd's tracing without
generating kernels: seconds); one uses "inductor", which generates and builds C++ kernels.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from sdpo_core.compiling import (
    MIN_BUCKET,
    CompileError,
    bucket_width,
    compile_stats,
    compiled_layers,
    decoder_layers,
)
from sdpo_core.config import ModelConfig
from sdpo_core.logprobs import TokenizedPair, collate_pairs, completion_logps
from sdpo_core.model_io import load_model
from sdpo_core.train import disable_activation_checkpointing, enable_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")
MODEL = Path(__file__).resolve().parents[2] / "models" / "stories260K"


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters from zero, so that each test counts its own graphs (the
    compiled code is shared by every module in the process; reset keeps the counters)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    return load_model(ModelConfig(name_or_path=str(MODEL)))


@pytest.fixture
def model(base_model) -> torch.nn.Module:
    return copy.deepcopy(base_model).train()


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of different lengths, so that rows are padded."""
    gen = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=gen))
        return torch.randint(3, 512, (length,), generator=gen).tolist()

    return [TokenizedPair(ids(4, 20), ids(2, 24), ids(2, 24)) for _ in range(n)]


def logps_and_grads(model: torch.nn.Module, pairs: list[TokenizedPair]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Completion log-probs of the padded layout and the gradient of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    logps, _ = completion_logps(model, collate_pairs(pairs, pad_id=0), chunk_rows=16)  # (2B,)
    weights = torch.linspace(-1.0, 1.0, logps.shape[0])  # signs differ, as chosen and rejected do in a DPO loss
    (logps * weights).sum().backward()
    return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-5 of each tensor's largest entry: compiled kernels sum in another order (fp32
    rounding), and a gradient's entries near 0 would fail any purely elementwise tolerance."""
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        scale = float(expected[name].abs().max())
        assert_close(value, expected[name], rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=lambda m, n=name: f"{n}: {m}")


def layer_call(model: torch.nn.Module, pairs: list[TokenizedPair]) -> tuple[tuple, dict]:
    """The arguments the first decoder layer receives in the padded layout's forward."""
    seen: dict[str, tuple] = {}

    def hook(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            completion_logps(model, collate_pairs(pairs, pad_id=0))
    finally:
        handle.remove()
    return seen["call"]


def test_bucket_width_is_monotonic_covering_and_pads_less_than_a_third():
    assert bucket_width(0) == bucket_width(1) == MIN_BUCKET == 64
    previous = 0
    for width in range(0, 9000):
        bucket = bucket_width(width)
        assert bucket >= width and bucket >= previous, width
        if width > MIN_BUCKET:
            assert (bucket - width) / bucket < 1 / 3, width
        previous = bucket
    assert sorted({bucket_width(w) for w in range(1, 513)}) == [64, 96, 128, 192, 256, 384, 512]
    assert bucket_width(513) == 768 and bucket_width(769) == 1024 and bucket_width(4096) == 4096
    with pytest.raises(ValueError, match="width -1"):
        bucket_width(-1)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_compiled_layer_forward_has_no_graph_break(model, training):
    """torch._dynamo.explain over the whole region that is compiled (the layer's call), with the
    arguments it gets in the padded layout: the hidden states, the rotary position embeddings,
    the position ids and no attention mask (SDPA's causal path)."""
    pairs = random_pairs(3)
    args, kwargs = layer_call(model.eval(), pairs)
    assert kwargs["attention_mask"] is None and kwargs["position_embeddings"] is not None
    model.train(training)
    hidden = args[0].detach().requires_grad_(training)
    with torch.set_grad_enabled(training):
        explained = torch._dynamo.explain(decoder_layers(model)[0])(hidden, *args[1:], **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_compiled_logps_and_gradients_equal_eager(model, checkpointing):
    pairs = random_pairs(4)
    eager = copy.deepcopy(model)
    if checkpointing:  # as train.py does: non-reentrant, with split attention's replay contexts
        enable_activation_checkpointing(model)
        enable_activation_checkpointing(eager)
    expected, expected_grads = logps_and_grads(eager, pairs)
    with compiled_layers(model, True, backend="aot_eager"):
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
        logps, grads = logps_and_grads(model, pairs)
    stats = compile_stats()
    # Five layers, one graph: they share the compiled code (a graph per layer would be 5).
    assert stats["graphs"] == 1 and stats["graph_breaks"] == 0 and stats["recompiles"] == 0, stats
    assert len(grads) == len(list(model.parameters()))
    assert_same({"logps": logps, **grads}, {"logps": expected, **expected_grads})
    if checkpointing:
        disable_activation_checkpointing(model)


def test_compiled_scoring_under_inference_mode_equals_eager(model):
    """The reference pass's setting: eval mode, inference_mode (a graph of its own)."""
    batch = collate_pairs(random_pairs(4), pad_id=0)
    model.eval()
    with torch.inference_mode():
        expected, _ = completion_logps(model, batch)
        with compiled_layers(model, True, backend="aot_eager"):
            logps, _ = completion_logps(model, batch)
    assert compile_stats() == {"graphs": 1, "recompiles": 0, "graph_breaks": 0}
    assert_close(logps, expected, rtol=1e-5, atol=1e-5)


def test_inductor_backend_equals_eager(model):
    """The real backend: inductor's generated C++ kernels on the CPU."""
    pairs = random_pairs(3)
    eager = copy.deepcopy(model)
    expected, expected_grads = logps_and_grads(eager, pairs)
    with compiled_layers(model, True):  # backend "inductor"
        logps, grads = logps_and_grads(model, pairs)
    assert compile_stats()["graphs"] == 1
    assert_same({"logps": logps, **grads}, {"logps": expected, **expected_grads})


def test_layers_are_plain_after_the_block_even_on_an_exception(model):
    enable_activation_checkpointing(model)
    layers = decoder_layers(model)
    checkpoint_funcs = [layer._gradient_checkpointing_func for layer in layers]
    pairs = random_pairs(2)
    with pytest.raises(ValueError, match="in the block"), compiled_layers(model, True, backend="aot_eager"):
        logps_and_grads(model, pairs)
        raise ValueError("in the block")
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert [layer._gradient_checkpointing_func for layer in layers] == checkpoint_funcs
    before = compile_stats()
    logps_and_grads(model, pairs)  # eager now: nothing is compiled
    assert compile_stats() == before
    disable_activation_checkpointing(model)


def test_disabled_compiles_nothing(model):
    with compiled_layers(model, False, backend="aot_eager"):
        assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
        logps_and_grads(model, random_pairs(2))
    assert compile_stats()["graphs"] == 0


def test_a_graph_break_in_a_layer_is_a_clear_error(model):
    mlp = decoder_layers(model)[2].mlp
    plain_forward = mlp.forward

    def breaking_forward(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return plain_forward(x)

    mlp.forward = breaking_forward
    with (
        pytest.raises(CompileError, match=r"LlamaDecoderLayer.*graph_break.*train\.compile=false"),
        compiled_layers(model, True, backend="aot_eager"),
    ):
        logps_and_grads(model, random_pairs(2))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


def test_a_model_without_decoder_layers_is_a_clear_error():
    with pytest.raises(CompileError, match=r"Sequential names no decoder layer class.*train\.compile=false"):
        with compiled_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), True):
            pass


def test_layers_are_found_under_a_subclass_such_as_fsdps(model):
    """fully_shard turns each layer into an instance of a subclass named FSDP<Layer>."""
    layer = decoder_layers(model)[1]
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    assert layer in decoder_layers(model) and len(decoder_layers(model)) == model.config.num_hidden_layers


def test_bucketed_widths_compile_one_graph_per_bucket(model):
    """Six different row widths, bucketed, take two shapes: two graphs, one of them a recompile,
    and repeated calls compile nothing more."""
    decoder = model.get_decoder()
    widths = [70, 90, 120, 100, 65, 128, 96, 97]
    assert {bucket_width(w) for w in widths} == {96, 128}
    gen = torch.Generator().manual_seed(1)
    with compiled_layers(model, True, backend="aot_eager"):
        for i, width in enumerate(widths):
            ids = torch.zeros(4, bucket_width(width), dtype=torch.long)  # right-padded with id 0
            ids[:, :width] = torch.randint(3, 512, (4, width), generator=gen)
            decoder(input_ids=ids, use_cache=False).last_hidden_state.sum().backward()
            if i == 0:
                assert compile_stats() == {"graphs": 1, "recompiles": 0, "graph_breaks": 0}
    assert compile_stats() == {"graphs": 2, "recompiles": 1, "graph_breaks": 0}


def test_compile_stats_are_minus_one_where_torch_keeps_no_such_count(monkeypatch):
    assert compile_stats() == {"graphs": 0, "recompiles": 0, "graph_breaks": 0}
    monkeypatch.delattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list")
    assert compile_stats()["recompiles"] == -1
    monkeypatch.delattr(torch._dynamo.utils, "counters")
    assert compile_stats() == {"graphs": -1, "recompiles": -1, "graph_breaks": -1}
