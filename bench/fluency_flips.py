"""Which fluency prompts fall into repetition loops after editing, and which climb out of them,
across runs and methods.

    python -m bench.fluency_flips --a docs/bench/articles-200/art-*/summary.json \
        --b docs/bench/articles-200/alphaedit-9000/summary.json ... --out results/fluency-flips/

A fluency ratio is a small net of large moves: after 200 edits some prompts' greedy texts lose a
bit or more of n-gram entropy (a loop set in) while others gain as much (a loop broke). This
reads, per prompt, the entropy change in every run of group A (and of group B, another method),
counts how often each prompt drops or rises by more than ``--flip`` bits, and sets that against
the unedited text's entropy: whether the same prompts flip whatever the edits were, and whether
it is the diverse texts that fall and the looping ones that recover. Runs must share the prompt
set (``fluency_entropies`` in ``summary.json``). ``--noise`` adds ``bench.fluency_noise``
results, one run per seed: whether random weight change of a like perplexity cost flips the
same prompts. Writes ``fluency-flips.json`` and ``fluency-flips.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.plots import pyplot, save_figure


def entropy_changes(path: Path) -> list[tuple[list[float], list[float]]]:
    """(unedited entropies, changed − unedited per prompt) for each run a file holds: one for a
    ``bench.editing`` summary.json, one per seed for a ``bench.fluency_noise`` result."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    unedited = data.get("unedited", {}).get("fluency_entropies")
    if "seed" in (data.get("runs") or [{}])[0]:  # random weight noise, one run per seed
        changed = [run.get("entropies") for run in data["runs"]]
    else:
        changed = [(data.get("checkpoints") or [{}])[-1].get("fluency_entropies")]
    if unedited is None or any(c is None for c in changed):
        raise SystemExit(
            f"{path}: no per-prompt fluency entropies (bench.editing writes them since "
            "session 13, bench.fluency_noise since session 22)"
        )
    out = []
    for entropies in changed:
        if len(entropies) != len(unedited):
            raise SystemExit(f"{path}: {len(entropies)} entropies for {len(unedited)} prompts")
        out.append((unedited, [e - u for e, u in zip(entropies, unedited, strict=True)]))
    return out


def group_flips(paths: Sequence[Path], flip: float) -> dict[str, Any]:
    """Per prompt, in how many runs it dropped / rose by more than ``flip`` bits, and per run the
    net change with the sums of its drops and rises."""
    if not paths:
        raise SystemExit("no runs given")
    base: list[float] | None = None
    drops: list[int] = []
    rises: list[int] = []
    runs = []
    for path, (unedited, change) in ((p, r) for p in paths for r in entropy_changes(p)):
        if base is None:
            base, drops, rises = unedited, [0] * len(change), [0] * len(change)
        elif len(unedited) != len(base):
            raise SystemExit(f"{path}: {len(unedited)} prompts, the first run had {len(base)}")
        for i, c in enumerate(change):
            drops[i] += c < -flip
            rises[i] += c > flip
        runs.append(
            {
                "run": str(path),
                "net": statistics.fmean(change),
                "dropped": sum(c for c in change if c < -flip),
                "rose": sum(c for c in change if c > flip),
                "n_dropped": sum(c < -flip for c in change),
                "n_rose": sum(c > flip for c in change),
            }
        )
    assert base is not None
    half = len(runs) / 2
    fallers = [i for i, n in enumerate(drops) if n >= half]
    risers = [i for i, n in enumerate(rises) if n >= half]
    return {
        "runs": runs,
        "unedited_entropies": base,
        "drops": drops,
        "rises": rises,
        "fallers": fallers,  # dropped in at least half the runs
        "risers": risers,
        "unedited_median_fallers": median_of(base, fallers),
        "unedited_median_risers": median_of(base, risers),
        "unedited_median_all": statistics.median(base),
    }


def median_of(values: Sequence[float], at: Sequence[int]) -> float | None:
    return statistics.median([values[i] for i in at]) if at else None


def overlap(a: Sequence[int], b: Sequence[int], n_prompts: int) -> dict[str, float]:
    """How many prompts two lists share, against what two random lists of those sizes would."""
    shared = len(set(a) & set(b))
    return {"shared": shared, "expected_by_chance": len(a) * len(b) / n_prompts}


def plot(path: Path, groups: dict[str, dict[str, Any]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, g in groups.items():
        n = len(g["runs"])
        net = [(r - d) / n for r, d in zip(g["rises"], g["drops"], strict=True)]
        ax.scatter(g["unedited_entropies"], net, s=14, alpha=0.7, label=f"{name} ({n} runs)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("unedited greedy text: n-gram entropy (bits)")
    ax.set_ylabel("share of runs rising − share falling")
    ax.set_title("Which fluency prompts flip after the edits")
    ax.legend()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.fluency_flips", description=__doc__.split("\n")[0]
    )
    p.add_argument("--a", nargs="+", type=Path, required=True, help="summary.json files")
    p.add_argument("--b", nargs="*", type=Path, default=[], help="another method's runs")
    p.add_argument(
        "--noise", nargs="*", type=Path, default=[], help="bench.fluency_noise results (per seed)"
    )
    p.add_argument("--a-name", default="A", help="what --a's runs are, for the plot")
    p.add_argument("--b-name", default="B", help="what --b's runs are")
    p.add_argument("--flip", type=float, default=0.7, help="bits of entropy that count as a flip")
    p.add_argument("--out", type=Path, default=Path("results/fluency-flips"))
    args = p.parse_args(argv)
    groups = {"A": group_flips(args.a, args.flip)}
    for name, paths in (("B", args.b), ("noise", args.noise)):
        if paths:
            groups[name] = group_flips(paths, args.flip)
    n_prompts = len(groups["A"]["unedited_entropies"])
    result: dict[str, Any] = {"flip_bits": args.flip, "groups": groups}
    for name in groups.keys() - {"A"}:
        if len(groups[name]["unedited_entropies"]) != n_prompts:
            raise SystemExit(f"--a and --{name.lower()} runs were read on different prompt sets")
        for kind in ("fallers", "risers"):
            result[f"shared_{kind}_A_{name}"] = overlap(
                groups["A"][kind], groups[name][kind], n_prompts
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fluency-flips.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    names = {"A": args.a_name, "B": args.b_name, "noise": "random weight noise"}
    plot(args.out / "fluency-flips.png", {names[k]: g for k, g in groups.items()})
    for name, g in groups.items():
        mean = {k: statistics.fmean(r[k] for r in g["runs"]) for k in g["runs"][0] if k != "run"}
        print(
            f"{name}: {len(g['runs'])} runs; per run {mean['n_dropped']:.1f} prompts fall "
            f"({mean['dropped']:+.1f} bits), {mean['n_rose']:.1f} rise ({mean['rose']:+.1f}), "
            f"net {mean['net']:+.3f}; falling in ≥ half the runs: {len(g['fallers'])} prompts, "
            f"unedited median {g['unedited_median_fallers']}; rising: {len(g['risers'])}, "
            f"unedited median {g['unedited_median_risers']} (all {g['unedited_median_all']:.2f})"
        )
    for key, value in result.items():
        if key.startswith("shared_"):
            print(f"{key}: {value['shared']} (by chance {value['expected_by_chance']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
