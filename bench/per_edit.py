"""The course of a long editing run, window by window, from its ``per_edit.jsonl``.

    python -m bench.per_edit results/edit-loki/per_edit.jsonl --window 100

Per window of edits: the share whose target became top-1 in every context, the median seconds
and steps, how often each layer was chosen, and each layer's cumulative change ‖W − W₀‖/‖W₀‖
at the window's end (the last value reported for it so far). A budget running out shows as
falling success and a layer's change pinned at the cap.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def windows(rows: Sequence[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    if size < 1:
        raise ValueError("window: must be positive")
    out: list[dict[str, Any]] = []
    change: dict[str, float] = {}
    for start in range(0, len(rows), size):
        window = rows[start : start + size]
        chunk = [r for r in window if "error" not in r]
        chosen: Counter[int] = Counter()
        for row in chunk:
            chosen.update(row.get("selected_layers", []))
            # an edit left out by --reject-unsuccessful reports the change it would have made
            applied = row.get("relative_change", {}) if row.get("applied", True) else {}
            for name, value in applied.items():
                change[_layer_of(name)] = value
        out.append(
            {
                "edits": f"{start}-{start + len(window) - 1}",
                "success": sum(bool(r.get("success")) for r in chunk) / max(1, len(chunk)),
                "failed": len(window) - len(chunk),
                "rejected": sum(not r.get("applied", True) for r in chunk),
                "median_seconds": statistics.median(r["seconds"] for r in chunk) if chunk else None,
                "median_steps": statistics.median(r["steps"] for r in chunk) if chunk else None,
                "chosen": dict(sorted(chosen.items())),
                "relative_change": dict(sorted(change.items(), key=lambda kv: int(kv[0]))),
            }
        )
    return out


def _layer_of(name: str) -> str:
    """ "model.layers.7.mlp.down_proj.weight" -> "7" (the first number in the name)."""
    return next((part for part in name.split(".") if part.isdigit()), name)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def render(table: Iterable[dict[str, Any]]) -> str:
    lines = [
        "| edits | success | median s | median steps | chosen (layer: times) | ‖W − W₀‖/‖W₀‖ |"
    ]
    lines.append("|---|---|---|---|---|---|")
    for w in table:
        chosen = ", ".join(f"{k}: {v}" for k, v in w["chosen"].items())
        change = ", ".join(f"{k}: {v:.2f}" for k, v in w["relative_change"].items())
        seconds = "" if w["median_seconds"] is None else f"{w['median_seconds']:.2f}"
        steps = "" if w["median_steps"] is None else f"{w['median_steps']:g}"
        lines.append(
            f"| {w['edits']} | {w['success']:.2f} | {seconds} | {steps} | {chosen} | {change} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.per_edit", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="per_edit.jsonl of a bench.editing run")
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    table = windows(read_rows(args.path), args.window)
    print(render(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
