"""Side-by-side table and bar chart of several ``bench.editing`` runs.

python -m bench.compare results/*/summary.json --out results/compare.md [--frontier f.png]

``--frontier`` also plots each run's edit-metric mean against its perplexity (edited ÷
unedited), one marker per slice of records: where every setting sits on the trade-off between
the two, against the perplexity target.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.plots import pyplot, save_figure

log = logging.getLogger("bench.compare")

EDIT_METRICS = ("efficacy", "generalization", "specificity")
HEADER = (
    "method",
    "efficacy",
    "generalization",
    "specificity",
    "mean of the three",
    "fluency",
    "perplexity",
    "perplexity (held-out text)",
    "median s/edit",
)


def load_summaries(paths: Sequence[Path]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if "metrics" not in data:
            log.warning("%s: run not finished, skipped", path)
            continue
        data["_dir"] = Path(path).parent.name
        data["_label"] = f"{data['method']} ({data['_dir']})"
        out.append(data)
    methods = [s["method"] for s in out]
    if len(set(methods)) == len(methods):  # directory names only where a method repeats
        for s in out:
            s["_label"] = s["method"]
    return out


def edit_mean(metrics: dict[str, Any]) -> float:
    """The mean of efficacy, generalisation and specificity: the issue's headline figure."""
    return sum(metrics[m] for m in EDIT_METRICS) / len(EDIT_METRICS)


def row(label: str, metrics: dict[str, Any], median: float | None) -> list[str]:
    cells = [label, *(f"{metrics[m]:.3f}" for m in EDIT_METRICS), f"{edit_mean(metrics):.3f}"]
    cells += [f"{metrics['fluency']:.3f}", f"{metrics['perplexity']:.2f}"]
    heldout = metrics.get("perplexity_heldout")  # absent from summaries written before it
    cells.append("-" if heldout is None else f"{heldout:.2f}")
    cells.append("-" if median is None else f"{median:.2f}")
    return cells


def _same_records(summaries: Sequence[dict[str, Any]]) -> bool:
    keys = {
        (s["dataset"], s["offset"], s["n_edits"], s["model"], json.dumps(s.get("eval_settings")))
        for s in summaries
    }
    return len(keys) == 1


def markdown(summaries: Sequence[dict[str, Any]]) -> str:
    rows = [list(HEADER), ["---"] * len(HEADER)]
    if summaries and _same_records(summaries):
        rows.append(row("unedited", summaries[0]["unedited"], None))
    for s in summaries:
        rows.append(row(s["_label"], s["metrics"], s["seconds_per_edit"]["median"]))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    if summaries:
        runs = sorted(
            {
                f"{s['dataset']} offset {s['offset']}, {s['n_edits']} edits, {s['model']}"
                for s in summaries
            }
        )
        lines += ["", "Runs: " + "; ".join(runs) + "."]
        if not _same_records(summaries):
            lines.append("Runs differ in records or model: no common unedited row.")
    return "\n".join(lines) + "\n"


def bar_chart(summaries: Sequence[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    import numpy as np

    series: list[tuple[str, dict[str, Any]]] = []
    if _same_records(summaries):
        series.append(("unedited", summaries[0]["unedited"]))
    series += [(s["_label"], s["metrics"]) for s in summaries]
    groups = [*EDIT_METRICS, "mean"]
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for i, (label, m) in enumerate(series):
        values = [*(m[k] for k in EDIT_METRICS), edit_mean(m)]
        left.bar(x + i * width, values, width, label=label)
    left.set_xticks(x + width * (len(series) - 1) / 2, groups)
    left.set_ylim(0, 1.05)
    left.set_ylabel("fraction of edits")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)

    # fluency and perplexity live on other scales: show them relative to each run's unedited model
    labels = [s["_label"] for s in summaries]
    xr = np.arange(2)
    wr = 0.8 / max(len(summaries), 1)
    for i, s in enumerate(summaries):
        vals = [s["metrics"][k] / s["unedited"][k] for k in ("fluency", "perplexity")]
        right.bar(xr + i * wr, vals, wr, label=labels[i])
    right.axhline(1.0, color="black", linestyle="--", linewidth=1)
    right.set_xticks(xr + wr * (len(summaries) - 1) / 2, ["fluency", "perplexity"])
    right.set_ylabel("edited / unedited")
    right.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def frontier_chart(
    summaries: Sequence[dict[str, Any]], path: Path, perplexity_target: float
) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    offsets = sorted({s["offset"] for s in summaries})
    markers = "osD^v<>p"
    for i, offset in enumerate(offsets):
        runs = [s for s in summaries if s["offset"] == offset]
        xs = [s["metrics"]["perplexity"] / s["unedited"]["perplexity"] for s in runs]
        ys = [edit_mean(s["metrics"]) for s in runs]
        ax.scatter(xs, ys, marker=markers[i % len(markers)], label=f"records from {offset}")
        for x, y, s in zip(xs, ys, runs, strict=True):
            ax.annotate(s["_dir"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(perplexity_target, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("perplexity, edited ÷ unedited (target: left of the dashed line)")
    ax.set_ylabel("mean of efficacy, generalisation, specificity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("summaries", nargs="*", help="summary.json files (default: results/*/)")
    p.add_argument("--out", type=Path, default=Path("results/compare.md"))
    p.add_argument("--png", type=Path, help="bar chart (default: --out with .png)")
    p.add_argument("--frontier", type=Path, help="also plot edit-metric mean against perplexity")
    p.add_argument("--perplexity-target", type=float, default=1.05, help="drawn on --frontier")
    args = p.parse_args(argv)
    paths = [Path(s) for s in args.summaries] or sorted(
        Path(s) for s in glob.glob("results/*/summary.json")
    )
    summaries = load_summaries(paths)
    if not summaries:
        p.error("no finished summary.json found")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(summaries)
    args.out.write_text(table, encoding="utf-8")
    bar_chart(summaries, args.png or args.out.with_suffix(".png"))
    if args.frontier:
        frontier_chart(summaries, args.frontier, args.perplexity_target)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
