"""The method study's report: per-objective statistics against span corruption (mean, std, 2
standard-error noise test), the Markdown table, the figures, and the README section."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# Each task's headline metric (the table's; every metric is kept in results.json).
HEADLINE = {
    "kjv_to_sparv": "bleu",
    "kjv_to_web": "bleu",
    "wiki_summary": "rougeLsum",
    "wiki_topic": "accuracy",
    "spelling_grammar": "edit_f0.5",
}
BASELINE = "span_corruption"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarize(finetuned: dict, tasks: Sequence[str]) -> dict:
    """{variant: {task: {metric, mean, std, n, diff, diff_se, outside_noise}}} for the headline
    metrics; diff is against span corruption, outside_noise when |diff| > 2 standard errors."""
    summary: dict[str, dict] = {}
    for variant, by_task in finetuned.items():
        for dataset in tasks:
            metric = HEADLINE[dataset]
            values = [m[metric] for m in by_task.get(dataset, {}).values()]
            if not values:
                continue
            mean, std = mean_std(values)
            summary.setdefault(variant, {})[dataset] = {
                "metric": metric,
                "mean": mean,
                "std": std,
                "n": len(values),
                "values": values,
            }
    base = summary.get(BASELINE, {})
    for variant, by_task in summary.items():
        for dataset, entry_ in by_task.items():
            if variant == BASELINE or dataset not in base:
                continue
            other = base[dataset]
            se = math.sqrt(entry_["std"] ** 2 / entry_["n"] + other["std"] ** 2 / other["n"])
            entry_["diff"] = entry_["mean"] - other["mean"]
            entry_["diff_se"] = se
            entry_["outside_noise"] = bool(abs(entry_["diff"]) > 2 * se and se > 0)
    return summary


def markdown_table(results: dict) -> str:
    """The results as Markdown: mean +- std per variant and task, then the differences."""
    tasks = results["tasks"]
    summary = results["summary"]
    header = "| pretraining objective | " + " | ".join(
        f"{t} ({results['headline_metrics'][t]})" for t in tasks
    )
    lines = [header + " |", "|---" * (len(tasks) + 1) + "|"]
    for variant, by_task in summary.items():
        cells = []
        for dataset in tasks:
            cell = by_task.get(dataset)
            cells.append(f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell else "—")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", f"Difference from {BASELINE} (± its standard error; * outside 2 s.e.):", ""]
    lines += [
        "| objective | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for variant, by_task in summary.items():
        if variant == BASELINE:
            continue
        cells = []
        for dataset in tasks:
            cell = by_task.get(dataset, {})
            if "diff" not in cell:
                cells.append("—")
                continue
            star = " *" if cell["outside_noise"] else ""
            cells.append(f"{cell['diff']:+.2f} ± {cell['diff_se']:.2f}{star}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    size = results["size"]
    lines += [
        "",
        f"{len(results['seeds'])} seeds; model `{size['model_gin']}`; pretraining "
        f"{size['pretrain_steps']} steps x {size['pretrain_batch']} x "
        f"{size['pretrain_lengths']} tokens; fine-tuning {size['finetune_steps']} steps x "
        f"{size['finetune_batch']}; test metrics on the first {size['test_examples']} test "
        f"examples. Machine: {results['machine']}; {results['date']}; "
        f"{results['elapsed_s'] / 60:.0f} min.",
    ]
    return "\n".join(lines) + "\n"


def curves_figure(results: dict) -> Figure:
    """The pretraining curves: each objective's loss against step, mean over seeds (min-max
    shaded). Returns the matplotlib Figure."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    for objective, by_seed in results["pretraining_curves"].items():
        curves = [np.asarray(c, np.float64) for c in by_seed.values() if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        steps = curves[0][:length, 0]
        losses = np.stack([c[:length, 1] for c in curves])
        axis.plot(steps, losses.mean(0), label=objective)
        axis.fill_between(steps, losses.min(0), losses.max(0), alpha=0.2)
    axis.set_xlabel("pretraining step")
    axis.set_ylabel("training loss (each objective's own)")
    axis.set_title("Pretraining: mean over seeds, min-max shaded")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def tasks_figure(results: dict) -> Figure:
    """One panel per task: each variant's headline test metric, mean with std error bars."""
    tasks, summary = results["tasks"], results["summary"]
    variants = list(summary)
    figure = Figure(figsize=(3.2 * len(tasks), 4.6))
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for axis, dataset in zip(axes, tasks, strict=True):
        means = [summary[v].get(dataset, {}).get("mean", np.nan) for v in variants]
        stds = [summary[v].get(dataset, {}).get("std", 0.0) for v in variants]
        colors = [f"C{i}" for i in range(len(variants))]
        axis.bar(range(len(variants)), means, yerr=stds, capsize=3, color=colors)
        axis.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize=7)
        axis.set_title(dataset, fontsize=9)
        metric = results["headline_metrics"][dataset]
        axis.set_ylabel(f"test {metric} (mean ± std over seeds)", fontsize=8)
        axis.set_xlabel("pretraining objective", fontsize=8)
    figure.tight_layout()
    return figure


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Writes pretraining_curves.png and tasks.png; returns their paths."""
    paths = [out_dir / "pretraining_curves.png", out_dir / "tasks.png"]
    for path, figure in zip(paths, (curves_figure(results), tasks_figure(results)), strict=True):
        figure.savefig(path, dpi=110)
    return paths


README_BEGIN = "<!-- study results: begin (written by python -m e2s2_jax.study --readme) -->"
README_END = "<!-- study results: end -->"


def noise_sentence(results: dict) -> str:
    """How many differences from span corruption are outside 2 standard errors, and which."""
    cells = [
        (variant, dataset, cell)
        for variant, by_task in results["summary"].items()
        for dataset, cell in by_task.items()
        if "diff" in cell
    ]
    outside = [f"{v} on {d} ({c['diff']:+.2f})" for v, d, c in cells if c["outside_noise"]]
    text = f"{len(outside)} of {len(cells)} differences from {BASELINE} are outside 2 s.e."
    if not outside:
        return text + "; every effect is within noise."
    return text + ": " + ", ".join(outside) + "."


def readme_section(results: dict, out_dir: Path, readme: Path) -> str:
    """The README's Results section body: command, machine, table, noise verdict, plots."""
    relative = os.path.relpath(out_dir, readme.parent)
    size = results.get("size_name", "quick")
    flag = "--quick" if size == "quick" else f"--size {size}"
    return "\n".join(
        [
            README_BEGIN,
            f"`python -m e2s2_jax.study {flag}` on {results['machine']}, {results['date']}: "
            f"{results['elapsed_s'] / 60:.0f} min. {noise_sentence(results)}",
            "",
            markdown_table(results).rstrip(),
            "",
            f"![pretraining curves]({relative}/pretraining_curves.png)",
            f"![test metrics per task]({relative}/tasks.png)",
            README_END,
        ]
    )


def replace_between_markers(readme: Path, begin: str, end: str, section: str) -> None:
    """Replaces `readme`'s text from the line `begin` to the line `end` with `section` (which
    carries both markers), or refuses, naming the markers, if either is missing."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(
            f"{readme} has no results markers: add the lines {begin!r} and {end!r} where the "
            "study's results should go"
        )
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + section + tail)


def update_readme(results: dict, out_dir: Path, readme: Path) -> None:
    """Replaces the text between README_BEGIN and README_END in `readme` with the results."""
    replace_between_markers(
        readme, README_BEGIN, README_END, readme_section(results, out_dir, readme)
    )


def write_outputs(results: dict, out_dir: Path) -> None:
    """Writes results.json, results.md and the two figures under `out_dir`."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown_table(results))
    plot(results, out_dir)
