"""The staged study's report (e2s2_jax/study_stages.py): paired differences by seed, the verdict
against each paper's direction, the sensitivity gate, the Markdown, the figures and the README.

A comparison pairs arm A with reference arm B run with the same seed (same initialisation, data
order and fine-tuning): d_s = A_s - B_s for every seed s both have; the report gives
mean(d) +- se(d) with se = std(d, ddof=1) / sqrt(n). A difference is outside the noise when
|mean| > 2 se (or, with se = 0, when mean != 0 and n > 1: every seed moved the same amount).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from e2s2_jax.study_report import HEADLINE, replace_between_markers

# The headline metric of each task, and of the e2s2 stage's frozen-encoder probe.
HEADLINES = {**HEADLINE, "probe_wiki_topic": "probe_accuracy"}
# Pretraining must beat random initialisation outside the noise on this many tasks.
GATE_TASKS = 3
# What each stage's paper reports for its arms against the reference arm: +1 better, -1 worse.
PAPER_DIRECTION = +1


def paired_differences(runs: dict, arm: str, reference: str, metric: str | None = None) -> dict:
    """{"tasks": {dataset: {metric, seeds, diffs, mean, se, n, outside_noise}}} of the
    headline metric (or `metric`), arm minus reference, over the seeds both arms have it for on
    that dataset."""
    out: dict = {}
    chosen = metric
    for dataset, by_seed in runs.get(arm, {}).items():
        metric = chosen or HEADLINES[dataset]
        base = runs.get(reference, {}).get(dataset, {})
        seeds = sorted(
            (s for s in by_seed if metric in by_seed[s] and metric in base.get(s, {})), key=int
        )
        if not seeds:
            continue
        diffs = [by_seed[s][metric] - base[s][metric] for s in seeds]
        mean, se = mean_se(diffs)
        out[dataset] = {
            "metric": metric,
            "seeds": [int(s) for s in seeds],
            "diffs": diffs,
            "arm_values": [by_seed[s][metric] for s in seeds],
            "reference_values": [base[s][metric] for s in seeds],
            "mean": mean,
            "se": se,
            "n": len(diffs),
            "outside_noise": outside_noise(mean, se, len(diffs)),
        }
    return {"tasks": out}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    array = np.asarray(values, np.float64)
    if len(array) < 2:
        return float(array.mean()), 0.0
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(len(array)))


def outside_noise(mean: float, se: float, n: int) -> bool:
    if n < 2:
        return False
    return bool(abs(mean) > 2 * se) if se > 0 else mean != 0


def verdict(entry: dict, direction: int = PAPER_DIRECTION) -> str:
    """ "same direction as the paper", "opposite" or "within noise", with the numbers."""
    numbers = f"{entry['mean']:+.2f} ± {entry['se']:.2f} {entry['metric']} over {entry['n']} seeds"
    if not entry["outside_noise"]:
        return f"within noise ({numbers})"
    same = (entry["mean"] > 0) == (direction > 0)
    return f"{'same direction as the paper' if same else 'opposite'} ({numbers})"


def sensitivity_verdict(comparison: dict, tasks: Sequence[str]) -> dict:
    """The gate: pretrained minus random initialisation is positive outside the noise on at
    least GATE_TASKS of the tasks."""
    ahead, measured = _ahead(comparison, tasks, sign=+1)
    passed = len(ahead) >= GATE_TASKS
    line = (
        f"{'passed' if passed else 'not passed'}: pretraining beats random initialisation by "
        f"more than 2 standard errors on {len(ahead)} of {len(measured)} tasks measured "
        f"({', '.join(ahead) or 'none'}); the gate needs {GATE_TASKS} of {len(tasks)}"
    )
    return {"passed": passed, "tasks_ahead": ahead, "line": line}


def cross_entropy_line(comparison: dict, tasks: Sequence[str]) -> str:
    """What the gate's rule gives on the teacher-forced test cross-entropy (lower is better):
    evidence of what the study can see when the decoded metrics cannot; the gate stays on the
    task metrics."""
    ahead, measured = _ahead(comparison, tasks, sign=-1)
    return (
        f"On the teacher-forced test cross-entropy, pretraining is lower by more than 2 standard "
        f"errors on {len(ahead)} of {len(measured)} tasks measured ({', '.join(ahead) or 'none'})"
    )


def _ahead(comparison: dict, tasks: Sequence[str], sign: int) -> tuple[list[str], list[str]]:
    """(the tasks whose paired difference is outside the noise with the sign `sign`, the tasks
    measured)."""
    measured = [t for t in tasks if t in comparison["tasks"]]
    entries = comparison["tasks"]
    ahead = [t for t in measured if entries[t]["outside_noise"] and entries[t]["mean"] * sign > 0]
    return ahead, measured


# ----------------------------------------------------------------------------- Markdown


def _arms(results: dict) -> list[str]:
    return list(results["runs"])


def markdown(results: dict) -> str:
    """Every arm's mean +- std per task, then each comparison's paired difference and verdict."""
    tasks = results["tasks"]
    header = "| arm | " + " | ".join(f"{t} ({results['headline_metrics'][t]})" for t in tasks)
    lines = [header + " |", "|---" * (len(tasks) + 1) + "|"]
    for arm in _arms(results):
        cells = []
        for dataset in tasks:
            values = [m[HEADLINES[dataset]] for m in results["runs"][arm].get(dataset, {}).values()]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                cells.append(f"{np.mean(values):.2f} ± {std:.2f} (n={len(values)})")
            else:
                cells.append("—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences by seed (mean ± standard error; * outside 2 s.e.):", ""]
    lines += ["| comparison | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for comparison in results["comparisons"]:
        cells = []
        for dataset in tasks:
            entry = comparison["tasks"].get(dataset)
            if entry is None:
                cells.append("—")
                continue
            star = " *" if entry["outside_noise"] else ""
            cells.append(f"{entry['mean']:+.2f} ± {entry['se']:.2f}{star}")
        name = f"{comparison['arm']} − {comparison['reference']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results.get("cross_entropy"):
        lines += [
            "",
            "The same pairs on the teacher-forced test cross-entropy (the first "
            "2 evaluation batches; lower is better, so a negative difference favours the arm):",
            "",
            "| comparison | " + " | ".join(tasks) + " |",
            "|---" * (len(tasks) + 1) + "|",
        ]
        for comparison in results["cross_entropy"]:
            cells = [
                f"{e['mean']:+.3f} ± {e['se']:.3f}{' *' if e['outside_noise'] else ''}"
                if (e := comparison["tasks"].get(t))
                else "—"
                for t in tasks
            ]
            name = f"{comparison['arm']} − {comparison['reference']}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *verdict_lines(results), "", footer(results)]
    return "\n".join(lines) + "\n"


def verdict_lines(results: dict) -> list[str]:
    if results["stage"] == "sensitivity":
        so_far = "" if results["status"] == "finished" else " (so far: the stage is partial)"
        lines = [f"Sensitivity gate{so_far}: {results['gate']['line']}."]
        if results.get("cross_entropy"):
            ce = cross_entropy_line(results["cross_entropy"][0], results["tasks"])
            lines += ["", f"{ce}; the gate itself is on the task metrics."]
        return lines
    lines = []
    for comparison in results["comparisons"]:
        for dataset, entry in comparison["tasks"].items():
            lines.append(
                f"- {comparison['arm']} vs {comparison['reference']} on {dataset}: {verdict(entry)}"
            )
    for name, generator in results.get("generators", {}).items():
        lines.append(
            f"- SSR generator `{name}`: kept {generator['kept']} of {generator['examples']} "
            f"windows, drop rate {100 * generator['drop_rate']:.1f}% (the aim: under 10%)"
        )
    return lines


def footer(results: dict) -> str:
    settings = {k: v for k, v in results["settings"].items() if k not in ("size", "stage")}
    examples = settings.get("decode_examples", -1)
    split = "full test splits" if examples == -1 else f"the first {examples} test examples"
    return (
        f"Stage `{results['stage']}` at size `{results['size_name']}` ({results['status']}); "
        f"{len(results['seeds'])} seeds; settings {json.dumps(settings)}; {split}. "
        f"Machine: {results['machine']}; {results['date']}; the runs took "
        f"{results['runs_seconds'] / 60:.0f} min."
    )


# ----------------------------------------------------------------------------- figures


def differences_figure(results: dict) -> Figure:
    """Each comparison's paired difference per task, mean with 2-s.e. error bars, and the
    seeds' own differences as points."""
    tasks = results["tasks"]
    comparisons = results["comparisons"]
    figure = Figure(figsize=(max(4.0, 2.2 * len(tasks)), 4.2))
    axis = figure.subplots()
    width = 0.8 / max(1, len(comparisons))
    for i, comparison in enumerate(comparisons):
        for j, dataset in enumerate(tasks):
            entry = comparison["tasks"].get(dataset)
            if entry is None:
                continue
            x = j + (i - (len(comparisons) - 1) / 2) * width
            label = f"{comparison['arm']} − {comparison['reference']}" if j == 0 else None
            axis.bar(x, entry["mean"], width, yerr=2 * entry["se"], capsize=3,
                     color=f"C{i}", alpha=0.7, label=label)  # fmt: skip
            axis.plot([x] * entry["n"], entry["diffs"], "k.", markersize=4)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(tasks)), [f"{t}\n({HEADLINES[t]})" for t in tasks], fontsize=8)
    axis.set_ylabel("paired difference (mean ± 2 s.e.; dots: seeds)")
    axis.set_title(f"{results['stage']} ({results['size_name']})")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def curves_figure(results: dict) -> Figure:
    """The pretraining / continuation curves: loss against step, mean over seeds."""
    figure = Figure(figsize=(6.5, 4.2))
    axis = figure.subplots()
    for name, by_seed in results["curves"].items():
        curves = [np.asarray(c, np.float64) for c in by_seed.values() if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        losses = np.stack([c[:length, 1] for c in curves])
        axis.plot(curves[0][:length, 0], losses.mean(0), label=name)
        axis.fill_between(curves[0][:length, 0], losses.min(0), losses.max(0), alpha=0.2)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (each run's own objective)")
    axis.set_title("mean over seeds, min-max shaded")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def write_stage_outputs(results: dict, out_dir: Path) -> None:
    """results.md, differences.png and curves.png under out_dir (results.json is the caller's)."""
    (out_dir / "results.md").write_text(markdown(results))
    differences_figure(results).savefig(out_dir / "differences.png", dpi=110)
    curves_figure(results).savefig(out_dir / "curves.png", dpi=110)


# ----------------------------------------------------------------------------- README

README_BEGIN = "<!-- study stages: begin (written by python -m e2s2_jax.study --readme) -->"
README_END = "<!-- study stages: end -->"


def readme_section(root: Path, stages: Sequence[str], readme: Path) -> str:
    """Every stage of one size: its results (from <root>/<stage>/results.json), or "not yet
    run"; nothing typed by hand."""
    lines = [README_BEGIN]
    for stage in stages:
        path = root / stage / "results.json"
        lines += ["", f"#### Stage `{stage}` (`--size {root.name}`)", ""]
        if not path.exists():
            lines.append("Not yet run.")
            continue
        results = json.loads(path.read_text())
        relative = os.path.relpath(root / stage, readme.parent)
        command = f"python -m e2s2_jax.study --size {results['size_name']} --stage {stage}"
        lines += [f"`{command}`", "", markdown(results).rstrip(), ""]
        if results["status"] == "finished":
            lines.append(f"![{stage} differences]({relative}/differences.png)")
            lines.append(f"![{stage} curves]({relative}/curves.png)")
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(root: Path, stages: Sequence[str], readme: Path) -> None:
    """Replaces the text between README_BEGIN and README_END in `readme`."""
    replace_between_markers(readme, README_BEGIN, README_END, readme_section(root, stages, readme))
