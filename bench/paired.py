"""Is one editing method better than another beyond noise? A paired comparison over records.

    python -m bench.paired --a results/loki-0/summary.json results/loki-2000/summary.json \
        --b results/ae-0/summary.json results/ae-2000/summary.json --out results/paired/

Both sides are ``bench.editing`` runs (written since session 14, when the final evaluation
started to keep each record's outcomes). Records are matched by dataset and case id and pooled
over every run given, so several slices of 200 edits add up to one comparison. Per metric and
for the mean of efficacy, generalisation and specificity it reports A − B with a 95% bootstrap
interval over the matched records (the same records resampled on both sides, which removes the
spread between easy and hard records that two unpaired figures carry). A 200-edit figure moves
by one or two points between runs that differ only in rounding (loki-log.md, "How much a 200-edit
figure moves between runs"); this interval does not see that run-to-run spread, only the
sampling of records, so a difference inside it is not a difference.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.plots import pyplot, save_figure
from workers.editing.evaluate import EDIT_METRICS

log = logging.getLogger("bench.paired")

MEAN = "mean of the three"


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, statistic: Any, *, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of ``statistic(a[i], b[i])`` with the same items i resampled on both sides.
    ``statistic`` takes two arrays of shape (draws, items, ...) and returns one per draw."""
    if a.shape[:1] != b.shape[:1] or a.shape[0] == 0:
        raise ValueError("a and b: need the same, non-zero number of items")
    picks = np.random.default_rng(seed).integers(0, a.shape[0], size=(draws, a.shape[0]))
    lo, hi = np.percentile(statistic(a[picks], b[picks]), [2.5, 97.5])
    return float(lo), float(hi)


def outcomes_of(paths: Sequence[Path]) -> tuple[str, dict[tuple[str, str], list[int]]]:
    """Method name and, per (dataset, case id), the final 0/1 outcome of each edit metric."""
    methods, table = set(), {}
    for path in paths:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
        final = (summary.get("checkpoints") or [{}])[-1]
        if not summary.get("complete") or "outcomes" not in final:
            raise SystemExit(
                f"{path}: no per-record outcomes (an unfinished run, or one written before they "
                "were kept)"
            )
        methods.add(summary["method"])
        got = final["outcomes"]
        for i, case in enumerate(got["case_id"]):
            table[(summary["dataset"], str(case))] = [got[m][i] for m in EDIT_METRICS]
    return "+".join(sorted(methods)), table


def compare(a_paths: Sequence[Path], b_paths: Sequence[Path]) -> dict[str, Any]:
    a_name, a = outcomes_of(a_paths)
    b_name, b = outcomes_of(b_paths)
    common = sorted(a.keys() & b.keys())
    if not common:
        raise SystemExit("the two sides share no records")
    xa = np.array([a[k] for k in common], dtype=float)
    xb = np.array([b[k] for k in common], dtype=float)
    sides = {m: (xa[:, j], xb[:, j]) for j, m in enumerate(EDIT_METRICS)}
    sides[MEAN] = (xa.mean(axis=1), xb.mean(axis=1))
    rows = {}
    for name, (pa, pb) in sides.items():
        lo, hi = paired_bootstrap(pa, pb, lambda u, v: u.mean(axis=-1) - v.mean(axis=-1))
        rows[name] = {
            "a": float(pa.mean()),
            "b": float(pb.mean()),
            "difference": float(pa.mean() - pb.mean()),
            "interval": [lo, hi],
            # records where one side is ahead (for the mean: holds more of the three), what
            # the difference is made of
            "only_a": int((pa > pb).sum()),
            "only_b": int((pb > pa).sum()),
        }
    return {
        "a": {"method": a_name, "runs": [str(p) for p in a_paths]},
        "b": {"method": b_name, "runs": [str(p) for p in b_paths]},
        "records": len(common),
        "unmatched": {"a": len(a) - len(common), "b": len(b) - len(common)},
        "metrics": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    a, b = result["a"]["method"], result["b"]["method"]
    lines = [
        f"| metric | {a} | {b} | {a} − {b} | 95% interval | records {a} ahead / {b} ahead |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["metrics"].items():
        lo, hi = r["interval"]
        lines.append(
            f"| {name} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} | "
            f"{lo:+.3f} to {hi:+.3f} | {r['only_a']} / {r['only_b']} |"
        )
    lines += ["", f"{result['records']} records matched by case id."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    names = list(result["metrics"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for y, name in enumerate(names):
        r = result["metrics"][name]
        lo, hi = r["interval"]
        ax.plot([lo, hi], [y, y], color="tab:blue", linewidth=2)
        ax.plot([r["difference"]], [y], "o", color="tab:blue")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    a, b = result["a"]["method"], result["b"]["method"]
    ax.set_xlabel(f"{a} − {b} (95% paired bootstrap, {result['records']} records)")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n")[0])
    p.add_argument("--a", type=Path, nargs="+", required=True, help="summary.json files, side A")
    p.add_argument("--b", type=Path, nargs="+", required=True, help="summary.json files, side B")
    p.add_argument("--out", type=Path, default=Path("results/paired"))
    args = p.parse_args(argv)
    result = compare(args.a, args.b)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paired.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    (args.out / "paired.md").write_text(table, encoding="utf-8")
    plot(result, args.out / "paired.png")
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
