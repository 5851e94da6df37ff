"""Where a LOKI edit's time goes: per-phase seconds over N sequential CounterFact edits.

    python -m bench.edit_phases --n 12 --threads 2 --out results/edit-phases.json [--set k=v]

Wraps the phases of ``LokiEditor`` (layer selection, v*, the per-layer solves, MPES and its
trim, bookkeeping) with timers; run it on an otherwise idle machine, since the figures are wall
time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.cli import COUNTERFACT, add_overrides, add_threads, read_overrides, use_threads
from workers.editing import loki
from workers.editing.datasets import load_records
from workers.editing.factory import build_editor
from workers.editing.model import load_model

PHASES = {
    "select": (loki.LokiEditor, "_select_layers"),
    "target_value": (loki, "optimise_target_values"),
    "solves": (loki, "spread_over_layers"),
    "mpes": (loki.LokiEditor, "_refine"),  # includes the trim
    "trim": (loki.LokiEditor, "_trim"),
    "bookkeeping": (loki.LokiEditor, "after_apply"),
}


def timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    return wrapper


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.edit_phases", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", default=COUNTERFACT)
    p.add_argument("--n", type=int, default=12)
    add_threads(p)
    add_overrides(p)
    p.add_argument("--out", type=Path, default=Path("results/edit-phases.json"))
    args = p.parse_args(argv)
    read_overrides(p, args)
    use_threads(args)

    lm = load_model()
    records = load_records(args.data, n=args.n)
    seconds: dict[str, list[float]] = defaultdict(list)
    originals = {name: getattr(owner, attr) for name, (owner, attr) in PHASES.items()}
    for name, (owner, attr) in PHASES.items():
        setattr(owner, attr, timed(originals[name], seconds[name]))
    try:
        editor = build_editor("loki", lm.model, lm.tokenizer, args.overrides)
        assert isinstance(editor, loki.LokiEditor)
        editor.contexts()  # generated once per model: not part of an edit
        for record in records:
            start = time.perf_counter()
            result = editor.apply([record.request])
            seconds["total"].append(time.perf_counter() - start)
            print(
                f"{seconds['total'][-1]:.2f} s, {result.steps} steps, layers "
                f"{result.selected_layers}, success {result.success}",
                flush=True,
            )
    finally:
        for name, (owner, attr) in PHASES.items():
            setattr(owner, attr, originals[name])
    summary = {
        name: {"median": statistics.median(v), "mean": statistics.mean(v), "n": len(v)}
        for name, v in seconds.items()
        if v  # a phase the configuration skips (the trim when off) has no timings
    }
    summary["threads"] = torch.get_num_threads()  # type: ignore[assignment]
    summary["overrides"] = args.overrides  # type: ignore[assignment]
    for name, stats in summary.items():
        if isinstance(stats, dict) and "median" in stats:
            print(f"{name:13s} median {stats['median']:.2f} s  mean {stats['mean']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
