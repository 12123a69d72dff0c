"""What an experiment compares: per-item outcomes of each arm's final model, the gamma matrix, and
the comparison table with bootstrap intervals.

Every outcome is one value per held-out item (a pair, or a prompt for sampled quantities), so the
arms are compared on the same items, seed by seed (sdpo_core.bootstrap).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdpo_core.bootstrap import Interval, interval, paired_difference, unpaired_difference
from sdpo_core.evaluate import Scores, gamma

METRICS = {
    "reward_accuracy_vs_m0": "implicit-reward accuracy, M0 as the reference",
    "reward_margin_vs_m0": "implicit-reward margin beta * (gamma_t - gamma_0)",
    "reference_free_accuracy": "P(gamma_t > 0): the model itself prefers the chosen completion",
    "chosen_logp_drift": "log pi_t(y_w|x) - log pi_0(y_w|x), summed over the completion",
    "kl_vs_m0": "KL(pi_t || pi_0), estimated from the model's own samples (nats per completion)",
    "gold_win_rate": "gold-reward win rate of the model's samples against M0's (ties count 1/2)",
}
"""The compared metrics, in report order, with what each means."""


def pair_outcomes(final: Scores, m0: Scores, beta: float) -> dict[str, np.ndarray]:
    """Per held-out pair, (N,) each: the final model's implicit-reward win and margin against M0,
    its own preference (gamma_t > 0), and the drift of the chosen completion's log-prob."""
    margin = beta * (gamma(final) - gamma(m0))
    return {
        "reward_accuracy_vs_m0": (margin > 0).double().numpy(),
        "reward_margin_vs_m0": margin.double().numpy(),
        "reference_free_accuracy": (gamma(final) > 0).double().numpy(),
        "chosen_logp_drift": (final["chosen"] - m0["chosen"]).double().numpy(),
    }


def gamma_matrix(scores: dict[str, dict[str, Scores]]) -> dict[str, dict[str, float]]:
    """Mean gamma (sum form) of each model on each column's pairs: ``{model: {column: mean}}``.

    Fig. 2 of the sDPO paper done so that rows compare: every model is scored on the same
    columns (each chunk and the eval split), not each on its own chunk.
    """
    return {
        model: {
            column: float(gamma(s).double().mean()) if len(s["chosen"]) else float("nan") for column, s in row.items()
        }
        for model, row in scores.items()
    }


def source_order_report(
    sources: dict[str, np.ndarray], order: list[str], *, replicates: int, confidence: float, seed: int
) -> dict[str, Any]:
    """M0's accuracy per source (0/1 per training pair) with intervals, and for each neighbour in
    the easy-to-hard ``order`` the difference: when its interval holds zero, the order between
    those two sources rests on a near-tie."""
    intervals = {s: interval(sources[s], replicates=replicates, confidence=confidence, seed=seed) for s in order}
    steps = []
    for easier, harder in zip(order, order[1:], strict=False):
        diff = unpaired_difference(
            sources[easier], sources[harder], replicates=replicates, confidence=confidence, seed=seed
        )
        steps.append(
            {"easier": easier, "harder": harder, "difference": diff.to_json(), "near_tie": not diff.excludes_zero()}
        )
    return {"m0_accuracy": {s: i.to_json() for s, i in intervals.items()}, "order": order, "neighbours": steps}


def compare_arms(
    outcomes: dict[str, dict[str, np.ndarray]],
    compare_to: str,
    *,
    replicates: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Each arm's metrics with intervals, and each arm against ``compare_to``, paired.

    Args:
        outcomes: ``{arm: {metric: (seeds, items)}}``; an arm may lack a metric (no gold reward).
        compare_to: the arm the differences are taken against (``compare_to - other``).
    """
    arms: dict[str, dict[str, Any]] = {}
    for arm, metrics in outcomes.items():
        arms[arm] = {
            m: interval(v, replicates=replicates, confidence=confidence, seed=seed).to_json()
            for m, v in metrics.items()
        }
    differences: dict[str, dict[str, Any]] = {}
    base = outcomes[compare_to]
    for arm, metrics in outcomes.items():
        if arm == compare_to:
            continue
        differences[arm] = {}
        for m, v in metrics.items():
            if m not in base:
                continue
            d = paired_difference(base[m], v, replicates=replicates, confidence=confidence, seed=seed)
            differences[arm][m] = d.to_json() | {"distinguishable": d.excludes_zero()}
    return {"compare_to": compare_to, "confidence": confidence, "arms": arms, "differences": differences}


def _cell(value: dict[str, float] | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return Interval(value["mean"], value["low"], value["high"], 0, 0).text(digits)


def comparison_markdown(comparison: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """comparison.md: the arms' metrics, the differences, the gamma matrix and the source order."""
    c = comparison["comparison"]
    level = round(100 * c["confidence"])
    metrics = [m for m in METRICS if any(m in a for a in c["arms"].values())]
    out = [f"# Experiment {comparison['name']!r}", ""]
    out.append(
        f"Final models on the shared eval split; mean [{level}% paired bootstrap interval over pairs and seeds]."
    )
    out.append("")
    out.append("| arm | seeds | optimizer steps | pairs trained | " + " | ".join(metrics) + " |")
    out.append("| --- " * (4 + len(metrics)) + "|")
    for arm, values in c["arms"].items():
        budget = comparison["budgets"].get(arm, {})
        cells = [_cell(values.get(m)) for m in metrics]
        out.append(
            f"| {arm} | {budget.get('seeds', '-')} | {budget.get('optimizer_steps', '-')} | "
            f"{budget.get('pairs', '-')} | " + " | ".join(cells) + " |"
        )
    out += ["", f"## {c['compare_to']} against each arm (paired: {c['compare_to']} - arm)", ""]
    out.append("| arm | metric | difference | told apart from zero? |")
    out.append("| --- | --- | --- | --- |")
    for arm, diffs in c["differences"].items():
        for m, d in diffs.items():
            out.append(f"| {arm} | {m} | {_cell(d)} | {'yes' if d['distinguishable'] else 'no'} |")
    out += ["", "Metrics:", ""] + [f"- `{m}`: {METRICS[m]}" for m in metrics]
    matrix = comparison.get("gamma_matrix") or {}
    if matrix:
        columns = list(next(iter(matrix.values())))
        out += ["", "## Mean gamma per model and data (Fig. 2, every model on the same columns)", ""]
        out.append("| model | " + " | ".join(columns) + " |")
        out.append("| --- " * (1 + len(columns)) + "|")
        for model, row in matrix.items():
            out.append(f"| {model} | " + " | ".join(f"{row[col]:.2f}" for col in columns) + " |")
    order = comparison.get("source_order")
    if order:
        out += ["", "## The easy-to-hard order (M0's reward accuracy per source)", ""]
        for s in order["order"]:
            out.append(f"- {s}: {_cell(order['m0_accuracy'][s])}")
        for n in order["neighbours"]:
            verdict = (
                "a near-tie: the interval of the difference holds zero, so this order is not established"
                if n["near_tie"]
                else "told apart"
            )
            out.append(f"- {n['easier']} before {n['harder']}: difference {_cell(n['difference'])}, {verdict}")
    for title, text in (extra or {}).items():
        out += ["", f"## {title}", "", text]
    return "\n".join(out) + "\n"
