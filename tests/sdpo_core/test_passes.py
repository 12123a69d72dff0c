"""The run's batch layout (sdpo_core.passes) as train_dpo and score_pairs use it: packed rows and
compiled layers give the padded layout's numbers."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

from sdpo_core import compiling, train
from sdpo_core.layouts import PairBatch, SharedPromptBatch
from sdpo_core.logprobs import score_pairs, score_passes
from sdpo_core.model_io import load_model
from sdpo_core.packed import PackedBatch
from sdpo_core.passes import PassLayout
from tests.sdpo_core import test_train
from tests.sdpo_core.test_train import BASE, MODEL_CFG, _train

pytestmark = pytest.mark.usefixtures("one_thread")
setup = test_train.setup  # the fixture: 8 real pairs and their reference log-probs


def test_layout_of_each_setting(setup) -> None:
    pairs = setup[0]
    assert PassLayout.of(False, pairs, 2048) == PassLayout("padded")
    assert PassLayout.of(True, pairs, 2048, bucketed=True) == PassLayout("shared", bucketed=True)
    assert PassLayout.of("packed", pairs, 2048) == PassLayout("packed", 2048)
    # A pair longer than the configured row widens every row of the run to a multiple of 128.
    longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert PassLayout.of("packed", pairs, 16).row_tokens == -(-longest // 128) * 128
    for bad in ("auto", "sometimes", None):
        with pytest.raises(ValueError, match="train.shared_prompt"):
            PassLayout.of(bad, pairs, 2048)


def test_collate_gives_each_layout(setup) -> None:
    pairs, _, pid = setup
    assert isinstance(PassLayout("padded").collate(pairs[:3], pid), PairBatch)
    assert isinstance(PassLayout("shared").collate(pairs[:3], pid), SharedPromptBatch)
    packed = PassLayout("packed", 512).collate(pairs[:3], pid)
    assert isinstance(packed, PackedBatch) and packed.input_ids.shape[1] == 512
    # Bucketed rows are padded to the bucket of the widest row, in both row layouts.
    for kind, rows in (("padded", 6), ("shared", 3)):
        plain = PassLayout(kind).collate(pairs[:3], pid).input_ids
        bucketed = PassLayout(kind, bucketed=True).collate(pairs[:3], pid).input_ids
        assert bucketed.shape == (rows, compiling.bucket_width(plain.shape[1])) and bucketed.shape[1] > plain.shape[1]
        assert torch.equal(bucketed[:, : plain.shape[1]], plain)


def test_score_passes_cover_every_pair_once(setup) -> None:
    pairs = setup[0]
    for layout, budget in (
        (PassLayout("packed", 256), 512),
        (PassLayout("packed", 256), None),
        (PassLayout("shared"), 300),
        (PassLayout("padded"), None),
    ):
        passes = score_passes(pairs, 3, budget, layout)
        assert sorted(i for ids in passes for i in ids) == list(range(len(pairs)))
        if budget is None and layout.kind != "padded":
            assert all(len(ids) <= 3 for ids in passes)
    # Packed passes under a budget hold at most budget // row_tokens rows.
    packed = PassLayout("packed", 256)
    for ids in score_passes(pairs, 3, 512, packed):
        assert packed.collate([pairs[i] for i in ids], 0).input_ids.shape[0] <= 2


def test_packed_scores_equal_padded_scores(setup) -> None:
    pairs, ref, pid = setup
    model = load_model(MODEL_CFG)
    for budget in (None, 256):
        packed = score_pairs(model, pairs, pid, 3, shared_prompt="packed", row_tokens=128, max_tokens=budget)
        for key in ("chosen", "rejected"):
            assert_close(packed[key], ref[key], rtol=0, atol=1e-4)
            assert torch.equal(packed[f"{key}_tokens"], ref[f"{key}_tokens"])


def test_packed_training_follows_padded_training(setup, monkeypatch) -> None:
    padded, base = _train(setup, BASE.model_copy(update={"shared_prompt": False}))
    rows: list[int] = []  # the packed passes train_dpo ran, by their rows
    forward = PackedBatch.forward
    monkeypatch.setattr(
        PackedBatch, "forward", lambda self, net: rows.append(self.input_ids.shape[0]) or forward(self, net)
    )
    for update, most_rows in (({"packed_row_tokens": 256}, 4), ({"packed_row_tokens": 128, "max_pass_tokens": 256}, 2)):
        rows.clear()
        weights, result = _train(setup, BASE.model_copy(update={"shared_prompt": "packed", **update}))
        assert rows and max(rows) <= most_rows
        assert result.optimizer_steps == base.optimizer_steps
        for got, want in zip(result.history, base.history, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
            assert got["rewards/margins"] == pytest.approx(want["rewards/margins"], abs=1e-5)
        assert max((weights[k] - padded[k]).abs().max().item() for k in weights) < 2e-4


@pytest.mark.parametrize("layout", [False, True, "packed"])
def test_compiled_training_follows_eager_training(setup, monkeypatch, layout) -> None:
    # The wiring of train.compile, traced with aot_eager (inductor's kernels are tested in test_compiling).
    monkeypatch.setattr(train, "compiled_layers", functools.partial(compiling.compiled_layers, backend="aot_eager"))
    update = {"shared_prompt": layout, "packed_row_tokens": 256}
    eager_weights, eager = _train(setup, BASE.model_copy(update=update))
    graphs = compiling.compile_stats()["graphs"]
    weights, compiled = _train(setup, BASE.model_copy(update={**update, "compile": True}))
    assert compiling.compile_stats()["graphs"] > graphs, "train.compile compiled nothing"
    for got, want in zip(compiled.history, eager.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert max((weights[k] - eager_weights[k]).abs().max().item() for k in weights) < 2e-4


@pytest.mark.parametrize("layout", [False, "packed"])
def test_compiled_scoring_follows_eager_scoring(setup, monkeypatch, layout) -> None:
    # The reference is scored in compiled layers when the policy trains in them (bf16 rounds
    # otherwise in compiled kernels: an eager reference would not give h = 0 at the first update).
    from sdpo_core import logprobs

    monkeypatch.setattr(logprobs, "compiled_layers", functools.partial(compiling.compiled_layers, backend="aot_eager"))
    pairs, ref, pid = setup
    model = load_model(MODEL_CFG)
    graphs = compiling.compile_stats()["graphs"]
    got = score_pairs(model, pairs, pid, 3, shared_prompt=layout, row_tokens=256, compiled=True)
    assert compiling.compile_stats()["graphs"] > graphs, "compiled scoring compiled nothing"
    for key in ("chosen", "rejected"):
        assert_close(got[key], ref[key], rtol=0, atol=1e-4)
    assert not model.model.layers[0]._compiled_call_impl, "the layers stay compiled after scoring"


def test_scores_cache_tells_compiled_scores_apart(tmp_path) -> None:
    from sdpo_core.config import RunConfig
    from sdpo_core.scores import scores_key

    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    cfg = RunConfig.model_validate({"data": {"sources": [{"path": str(data)}]}})
    compiled = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    assert scores_key(cfg, "fp", data) != scores_key(compiled, "fp", data)
