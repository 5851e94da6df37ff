"""Where the perplexity drift of sequential LOKI edits comes from.

    python -m bench.drift --n 100 --threads 1 --out results/drift/

Applies N CounterFact edits with LOKI (``--set`` changes its config), then reads on the fixed
text (``--text heldout``: the entity-rich second text):
- per edited layer, the perplexity with only that layer's accumulated change in place (the
  others back at W₀), against all of them together;
- per layer, how the edits' effects on the text's down-projection outputs add up: ‖Σᵢ ΔWᵢK‖²
  ÷ Σᵢ ‖ΔWᵢK‖², 1 when they are uncorrelated, up to N when they all push one way;
- across layers, whether the layers push a token the same way: ‖Σₗ ΔWₗkₗ‖² ÷ Σₗ ‖ΔWₗkₗ‖² over
  the text's tokens (1 when the layers' pushes are unrelated, up to the number of layers when
  they all point one way), on every token and on the 100 whose prediction was damaged most;
- per layer, the median ‖ΔW‖ and the median ‖a‖ of the factored changes (with ``exact_fit``,
  bᵀk = 1, so ‖a‖ is the part of v* − h that the layer delivered);
- per token, how the damage is spread: the share of tokens that got more likely, and the share
  of the net NLL increase carried by the 100 most damaged tokens;
- with ``--scales``, the perplexity with every layer's accumulated change scaled by s (how the
  damage grows with the change: linearly, or as its square);
- with ``--per-edit``, each edit's own share: the perplexity with that one edit taken back out
  of the final model, so one sees whether a few edits or all of them carry the drift; and
  each edit's cost when it was made (perplexity right after it minus right before), with the
  correlation of the two: can a check at edit time tell the costly edits?
- with ``--fluency-blocks K``, fluency (bench.editing's 100 prompts, read the same way) on the
  unedited model, with every edit, and with each run of K consecutive edits taken back out:
  does a group of edits carry the fluency loss, or all of them a little?
Writes ``drift.json`` and ``drift.png`` (perplexity increase per layer alone, and all together).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.cli import COUNTERFACT, add_overrides, add_threads, read_overrides, use_threads
from bench.editing import Evaluator
from bench.plots import pyplot, save_figure
from workers.editing.datasets import load_records
from workers.editing.delta import MatrixDelta
from workers.editing.evaluate import PERPLEXITY_TEXTS, scored_windows, token_nll
from workers.editing.factory import build_editor
from workers.editing.keys import read_text_keys
from workers.editing.loki import LokiEditor
from workers.editing.model import load_model

TOP_TOKENS = 100


def quadrature_ratio(changes: list[MatrixDelta], keys: torch.Tensor) -> float:
    """‖Σᵢ ΔWᵢK‖² ÷ Σᵢ ‖ΔWᵢK‖² over the text's keys K."""
    outputs = [keys @ change.to_dense().float().T for change in changes]
    together = float(torch.stack(outputs).sum(dim=0).pow(2).sum())
    apart = sum(float(o.pow(2).sum()) for o in outputs)
    return together / apart if apart > 0 else float("nan")


def cross_layer_ratio(pushes: list[torch.Tensor], rows: torch.Tensor | None = None) -> float:
    """‖Σₗ pₗ‖² ÷ Σₗ ‖pₗ‖² summed over tokens, pₗ (tokens × d_model) the change each layer adds
    to each token's residual stream; ``rows`` keeps only those tokens."""
    if rows is not None:
        pushes = [p[rows] for p in pushes]
    together = float(torch.stack(pushes).sum(dim=0).pow(2).sum())
    apart = sum(float(p.pow(2).sum()) for p in pushes)
    return together / apart if apart > 0 else float("nan")


def predicting_positions(n_ids: int, window: int = 512) -> torch.Tensor:
    """For each token ``token_nll`` scores, the position whose residual stream predicts it."""
    spans = scored_windows(n_ids, window)
    return torch.tensor([i for span in spans for i in span[:-1]], dtype=torch.long)


def ppl_of(nll: torch.Tensor) -> float:
    return float(nll.double().mean().exp())


def per_edit_shares(
    without: list[float], along: list[float], unedited: float, edited: float
) -> dict[str, Any]:
    """Each edit's marginal cost (final perplexity minus perplexity without it), summarised
    against the total increase: do a few edits carry it, or all of them a little? ``along``:
    the perplexity after each edit as it was made, for each edit's cost at that time."""
    if not without:
        return {}
    marginal = [edited - w for w in without]
    at_edit = [after - before for before, after in zip([unedited, *along], along, strict=False)]
    total = edited - unedited
    top = max(1, len(marginal) // 10)
    costliest = sorted(range(len(marginal)), key=marginal.__getitem__, reverse=True)[:top]
    flagged = sorted(range(len(at_edit)), key=at_edit.__getitem__, reverse=True)[:top]

    def share_of_total(edits: list[int]) -> float:
        return sum(marginal[i] for i in edits) / total if total else float("nan")

    return {
        "at_edit": [round(c, 4) for c in at_edit],
        "correlation_at_edit_vs_marginal": float(
            torch.corrcoef(torch.tensor([at_edit, marginal], dtype=torch.float64))[0, 1]
        )
        if len(marginal) > 1
        else float("nan"),
        "top_tenth_at_edit_share_of_total": share_of_total(flagged),
        "marginal": [round(m, 4) for m in marginal],
        "sum_of_marginals_over_total": share_of_total(list(range(len(marginal)))),
        "top_tenth_share_of_total": share_of_total(costliest),
        "most_costly": costliest,
        "share_negative": sum(m < 0 for m in marginal) / len(marginal),
    }


def plot(path: Path, summary: dict[str, Any]) -> None:
    plt = pyplot()

    layers = summary["layers"]
    names = [str(layer) for layer in layers] + ["all"]
    base = summary["perplexity"]["unedited"]
    values = [layers[layer]["ppl_alone"] - base for layer in layers]
    values.append(summary["perplexity"]["edited"] - base)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values, color=["C0"] * len(layers) + ["C3"])
    ax.set_xlabel("edited layer, its accumulated change alone")
    ax.set_ylabel("perplexity increase")
    ax.set_title(f"Drift after {summary['n_edits']} edits, by layer")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=COUNTERFACT)
    p.add_argument("--n", type=int, default=100, help="edits to apply")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--ppl-tokens", type=int, help="score only the text's first tokens")
    p.add_argument(
        "--text",
        choices=sorted(PERPLEXITY_TEXTS),
        default="fixed",
        help="the text perplexity is read on (heldout: the entity-rich second text)",
    )
    p.add_argument(
        "--scales", default="", help="comma-separated factors for the whole change, e.g. 0.5,0.75"
    )
    p.add_argument("--per-edit", action="store_true", help="take each edit back out alone")
    p.add_argument(
        "--fluency-blocks",
        type=int,
        default=0,
        metavar="K",
        help="fluency with each run of K consecutive edits taken back out (0: off)",
    )
    p.add_argument("--fluency-prompts", type=int, help="use only the first N prompts (smoke runs)")
    p.add_argument("--fluency-tokens", type=int, default=100, help="greedy tokens per prompt")
    p.add_argument(
        "--reject-unsuccessful",
        action="store_true",
        help="leave out edits whose target did not become top-1 everywhere, as the service does",
    )
    add_threads(p)
    add_overrides(p)
    p.add_argument("--out", type=Path, default=Path("results/drift"))
    args = p.parse_args(argv)
    read_overrides(p, args)
    if args.n < 1 or args.offset < 0 or args.fluency_blocks < 0:
        p.error("--n must be positive, --offset and --fluency-blocks not negative")
    try:
        scales = [float(x) for x in args.scales.split(",") if x.strip()]
    except ValueError:
        p.error(f"--scales: expected numbers separated by commas, got {args.scales!r}")
    if any(x < 0 for x in scales):
        p.error("--scales: factors must not be negative")
    use_threads(args)

    lm = load_model()
    model, tokenizer = lm.model, lm.tokenizer
    records = load_records(args.data, offset=args.offset, n=args.n)
    editor = build_editor("loki", model, tokenizer, args.overrides)
    assert isinstance(editor, LokiEditor)
    text = PERPLEXITY_TEXTS[args.text]()

    def nll() -> torch.Tensor:
        return token_nll(model, tokenizer, text, max_tokens=args.ppl_tokens)

    before = nll()
    reader = Evaluator.for_fluency(
        model, tokenizer, tokens=args.fluency_tokens, prompts=args.fluency_prompts
    )

    def fluency() -> float:
        return statistics.fmean(reader.entropies(full=True))

    fluency_before = fluency() if args.fluency_blocks else None
    changes: dict[int, list[MatrixDelta]] = defaultdict(list)
    per_edit: list[list[tuple[int, MatrixDelta]]] = []
    successes = 0
    along: list[float] = []  # perplexity right after each edit (--per-edit)
    for record in tqdm(records, unit="edit", desc="drift edits"):
        result = editor.apply([record.request], require_success=args.reject_unsuccessful)
        successes += result.success
        if args.per_edit:
            along.append(ppl_of(nll()))
        kept = result.deltas if result.applied else []
        per_edit.append([(int(d.name.split(".")[2]), d) for d in kept])
        for layer, delta in per_edit[-1]:
            changes[layer].append(delta)
    after = nll()
    layers = sorted(changes)
    keys = read_text_keys(model, tokenizer, text, layers, window=512, max_tokens=args.ppl_tokens)

    per_layer: dict[int, dict[str, float]] = {}
    weights = {layer: editor.modules[layer].weight for layer in layers}
    edited = {layer: w.detach().clone() for layer, w in weights.items()}

    def use(replaced: dict[int, torch.Tensor]) -> None:
        """These layers' weights replaced, the others as edited."""
        with torch.no_grad():
            for layer in layers:
                weights[layer].copy_(replaced.get(layer, edited[layer]))

    def ppl_with(replaced: dict[int, torch.Tensor]) -> float:
        use(replaced)
        return ppl_of(nll())

    def taken_back(edits: range) -> dict[int, torch.Tensor]:
        out = {layer: w.clone() for layer, w in edited.items()}
        for i in edits:
            for layer, d in per_edit[i]:
                out[layer] -= d.to_dense().to(out[layer])
        return out

    try:
        for layer in layers:
            factored = [float(d.a.norm()) for d in changes[layer] if d.a is not None]
            per_layer[layer] = {
                "edits": len(changes[layer]),
                "ppl_alone": ppl_with({o: editor.base[o] for o in layers if o != layer}),
                "quadrature_ratio": quadrature_ratio(changes[layer], keys[layer]),
                "median_delta_norm": statistics.median(d.norm() for d in changes[layer]),
                "median_output_norm": statistics.median(factored) if factored else float("nan"),
                "relative_change": editor.relative_drift(layer),
            }
        scaled: dict[str, float] = {}
        bases = {layer: editor.base[layer].to(edited[layer]) for layer in layers}
        for factor in scales:
            scaled[str(factor)] = ppl_with(
                {layer: base + factor * (edited[layer] - base) for layer, base in bases.items()}
            )
        without = [
            ppl_with(taken_back(range(i, i + 1)))
            for i in tqdm(
                range(len(per_edit)) if args.per_edit else [], unit="edit", desc="take back"
            )
        ]
        fluency_summary: dict[str, Any] = {}
        if args.fluency_blocks:
            use({})
            fluency_summary = {"unedited": fluency_before, "edited": fluency(), "without": []}
            size = args.fluency_blocks
            for start in tqdm(range(0, len(per_edit), size), unit="block", desc="fluency"):
                block = range(start, min(start + size, len(per_edit)))
                use(taken_back(block))
                fluency_summary["without"].append(
                    {"edits": [block.start, block.stop - 1], "fluency": fluency()}
                )
    finally:
        with torch.no_grad():
            for layer, w in weights.items():
                w.copy_(edited[layer])

    increase = after - before
    net = float(increase.sum())
    most_damaged = increase.sort(descending=True)
    top = float(most_damaged.values[:TOP_TOKENS].sum())
    # the weights are back to the edited ones here, so drift() is each layer's whole change
    pushes = [keys[layer] @ editor.drift(layer).cpu().T for layer in layers]
    damaged = predicting_positions(len(keys[layers[0]]))[most_damaged.indices[:TOP_TOKENS].cpu()]
    several = len(layers) > 1  # one layer has nothing to line up with
    summary: dict[str, Any] = {
        "model": lm.name,
        "n_edits": len(records),
        "offset": args.offset,
        "overrides": args.overrides,
        "text": args.text,
        "edit_success_rate": successes / len(records),
        "perplexity": {
            "unedited": ppl_of(before),
            "edited": ppl_of(after),
        },
        "layers": per_layer,
        "perplexity_scaled": scaled,
        "cross_layer_ratio": {
            "all_tokens": cross_layer_ratio(pushes) if several else float("nan"),
            f"top_{TOP_TOKENS}_damaged": cross_layer_ratio(pushes, damaged)
            if several
            else float("nan"),
            "layers": len(layers),
        },
        "per_edit": per_edit_shares(without, along, ppl_of(before), ppl_of(after)),
        "fluency": fluency_summary,
        "rejected": sum(not deltas for deltas in per_edit),
        "tokens": {
            "scored": int(increase.numel()),
            "share_more_likely": float((increase < 0).double().mean()),
            f"share_of_net_increase_in_top_{TOP_TOKENS}": top / net if net else float("nan"),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot(args.out / "drift.png", summary)
    return summary


if __name__ == "__main__":
    main()
