"""evaluate.harness: lm-evaluation-harness on a model folder, with a local custom task (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdpo_core.config import ConfigError, from_dict
from sdpo_core.config_sections import HarnessConfig
from sdpo_core.harness import check_available, flatten_results, metric_name

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "stories260K"
# Two-way choices after a story opening: the tiny model gets some right and some wrong.
ITEMS = [
    {"question": "Once upon a time, there was a little", "choices": ["girl", "table"], "answer": 0},
    {"question": "The dog wanted to play with the", "choices": ["sky", "ball"], "answer": 1},
    {"question": "She was very", "choices": ["happy", "ran"], "answer": 1},
    {"question": "Tom and his mom went to the", "choices": ["the", "park"], "answer": 0},
]


def write_task(folder: Path, name: str = "sdpo_tiny_choice") -> Path:
    """A 4-item multiple-choice task over a local JSON-lines file (what evaluate.harness.include_path names)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def own_accuracy() -> float:
    """The task's accuracy computed here: the choice with the higher log-prob of ' ' + choice
    after the question, the continuation being what the joint tokenization adds to the question's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    right = 0
    for item in ITEMS:
        scores = []
        for choice in item["choices"]:
            context = tok(item["question"], add_special_tokens=False).input_ids
            whole = tok(item["question"] + " " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logps = model(ids).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logps[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return right / len(ITEMS)


@pytest.mark.integration  # lm_eval and a model: about a minute on 2 cores
def test_the_harness_scores_a_local_task_as_computed_here(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    from sdpo_core.harness import harness_scores

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    cfg = HarnessConfig(tasks=("sdpo_tiny_choice",), include_path=str(write_task(tmp_path / "tasks")), batch_size=4)
    scores = harness_scores(MODEL_DIR, cfg, "cpu")
    expected = own_accuracy()
    print("harness:", scores, "computed here:", expected)
    assert 0 < expected < 1, "the items separate right from wrong (else the check shows little)"
    assert scores == {"harness/sdpo_tiny_choice/acc": pytest.approx(expected)}


@pytest.mark.integration  # lm_eval's task index: seconds
def test_unknown_harness_tasks_are_named(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from sdpo_core.harness import harness_scores

    cfg = HarnessConfig(tasks=("no_such_task_here",), include_path=str(write_task(tmp_path / "tasks")))
    with pytest.raises(ConfigError, match="unknown task.*no_such_task_here"):
        harness_scores(MODEL_DIR, cfg, "cpu")


def test_the_harness_asked_for_without_lm_eval_is_one_clear_error(monkeypatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    base = {"data": {"sources": [{"path": "a.jsonl"}]}}
    check_available(from_dict(base))  # off by default: nothing to check
    with pytest.raises(ConfigError, match=r"lm_eval is not installed: pip install 'sdpo\[harness\]'"):
        check_available(from_dict(base | {"evaluate": {"harness": {"tasks": ["arc_easy"]}}}))


def test_include_path_must_be_a_folder(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    cfg = from_dict(
        {
            "data": {"sources": [{"path": "a.jsonl"}]},
            "evaluate": {"harness": {"tasks": ["t"], "include_path": str(tmp_path / "nope")}},
        }
    )
    with pytest.raises(ConfigError, match="include_path: .*nope is not a folder"):
        check_available(cfg)


def test_results_become_metric_names() -> None:
    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.75},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": float("nan")},
    }
    assert flatten_results(results) == {
        "harness/arc_easy/acc": 0.5,
        "harness/arc_easy/acc_norm": 0.75,
        "harness/gsm8k/exact_match_strict-match": 0.25,
    }
    assert metric_name("mmlu (5-shot)", "acc,none") == "harness/mmlu _5-shot_/acc"  # MLflow refuses ( )
    assert metric_name("a,b", "acc,x:y") == "harness/a_b/acc_x_y"
