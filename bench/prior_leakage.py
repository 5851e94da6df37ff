"""How far each ridge prior keeps an edit's input direction off ordinary text.

    python -m bench.prior_leakage --out results/prior-leakage/

LOKI's update reads a subject key k through the input direction u = (λC + αI)⁻¹k, C the prior's
E[kkᵀ]: the ridge of ``Projector.ridge_update`` without the past edits' keys and without the
projector P off W₀'s dominant inputs, so the prior's part alone, on the unedited model. Every
ordinary token t is then moved in proportion to uᵀk_t, so for a unit of the edit delivered at
k the text's MLP outputs move by

    leakage = uᵀ C_text u / (uᵀk)²,   C_text = E[kkᵀ] over the text's tokens.

It is read on the fixed perplexity text and on the held-out one, for subject keys of
CounterFact records, at the default candidate layers. Beside it, how much of the prompt's
response u keeps on the paraphrase's subject key (uᵀk_para / uᵀk, median): what a prior that
buys its protection by narrowing u to the exact prompt would lose in generalisation. And how
much of the text's key energy lies along u per unit of ‖u‖², against a random direction
(tr C_text / d): an accumulated change reads ordinary text like random weight noise of its
norm when this is 1.
Priors: none (α only), the model's own text in each ``self_text_style``, and the baselines'
shipped prose (K₀: AlphaEdit and MEMIT protect exactly this, which LOKI may not read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.cli import COUNTERFACT, add_threads, use_threads
from bench.plots import pyplot, save_figure
from workers.editing.arch import num_layers
from workers.editing.datasets import load_records
from workers.editing.evaluate import PERPLEXITY_TEXTS
from workers.editing.keys import read_at_subject, read_text_keys
from workers.editing.loki import LokiConfig
from workers.editing.model import load_model
from workers.editing.stats import key_second_moments

DEFAULTS = LokiConfig()  # λ, α, the layers and the articles' length are the editor's own
OPENINGS_TOKENS = 4096  # the openings' length while they were the default (before session 21)


def second_moment(keys: torch.Tensor) -> torch.Tensor:
    k = keys.double()
    return k.T @ k / k.shape[0]


def input_directions(
    prior: torch.Tensor | None, keys: torch.Tensor, *, weight: float, alpha: float
) -> torch.Tensor:
    """(d, n): u = (weight·prior + alpha·I)⁻¹ k for each row k of ``keys``."""
    d = keys.shape[1]
    a = alpha * torch.eye(d, dtype=torch.float64)
    if prior is not None:
        a = a + weight * prior.double()
    return torch.linalg.solve(a, keys.double().T)


def leakage(u: torch.Tensor, keys: torch.Tensor, text_moment: torch.Tensor) -> torch.Tensor:
    """Per key: uᵀ C_text u / (uᵀk)²."""
    own = (u * keys.double().T).sum(0)
    return (u * (text_moment.double() @ u)).sum(0) / own**2


def against_random(u: torch.Tensor, text_moment: torch.Tensor) -> torch.Tensor:
    """Per key: the text's key energy along u per unit ‖u‖², over a random direction's
    (tr C_text / d). 1 means ordinary text reads u as much as it reads random weight noise of
    the same norm."""
    c = text_moment.double()
    along = (u * (c @ u)).sum(0) / (u * u).sum(0)
    return along / (torch.trace(c) / c.shape[0])


def paraphrase_response(u: torch.Tensor, keys: torch.Tensor, para: torch.Tensor) -> torch.Tensor:
    """Per key: uᵀk_para / uᵀk."""
    return (u * para.double().T).sum(0) / (u * keys.double().T).sum(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.prior_leakage", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", default=COUNTERFACT)
    p.add_argument("--offset", type=int, default=2000)
    p.add_argument("--n", type=int, default=100, help="CounterFact records for subject keys")
    p.add_argument(
        "--weight", type=float, default=DEFAULTS.self_text_weight, help="λ: self_text_weight"
    )
    p.add_argument("--alpha", type=float, default=DEFAULTS.l2, help="α: LOKI's l2")
    p.add_argument("--out", type=Path, default=Path("results/prior-leakage"))
    add_threads(p)
    args = p.parse_args(argv)
    use_threads(args)

    lm = load_model()
    model, tokenizer = lm.model, lm.tokenizer
    layers = DEFAULTS.resolve_layers(num_layers(model))
    records = load_records(args.data, offset=args.offset, n=args.n)
    requests = [r.request for r in records]
    subject = read_at_subject(model, tokenizer, requests, ["{}"], layers).keys
    with_para = [i for i, r in enumerate(records) if r.request.subject in r.rephrase_prompt]
    rephrased = [
        dataclasses.replace(records[i].request, prompt=records[i].rephrase_prompt)
        for i in with_para
    ]
    para = read_at_subject(model, tokenizer, rephrased, ["{}"], layers).keys
    texts = {
        name: {
            layer: second_moment(keys)
            for layer, keys in read_text_keys(model, tokenizer, read(), layers, window=256).items()
        }
        for name, read in PERPLEXITY_TEXTS.items()
    }
    priors: dict[str, dict[int, torch.Tensor] | None] = {
        "none (alpha only)": None,
        f"own text, openings ({OPENINGS_TOKENS // 1024}k)": key_second_moments(
            model, tokenizer, layers, max_tokens=OPENINGS_TOKENS, source="self"
        ),
        f"own text, articles ({DEFAULTS.self_text_tokens // 1024}k)": key_second_moments(
            model,
            tokenizer,
            layers,
            max_tokens=DEFAULTS.self_text_tokens,
            source="self",
            style="articles",
        ),
        "shipped prose (K0, baselines only)": key_second_moments(model, tokenizer, layers),
    }
    rows = []
    for name, prior in priors.items():
        row: dict[str, object] = {"prior": name}
        for layer in layers:
            k = subject[layer].cpu()
            u = input_directions(
                None if prior is None else prior[layer], k, weight=args.weight, alpha=args.alpha
            )
            for text, moment in texts.items():
                row[f"leakage_{text}_layer{layer}"] = float(leakage(u, k, moment[layer]).mean())
                row[f"random_{text}_layer{layer}"] = float(against_random(u, moment[layer]).mean())
            response = paraphrase_response(u[:, with_para], k[with_para], para[layer].cpu())
            row[f"paraphrase_layer{layer}"] = float(response.median())
        for key in (*(f"{m}_{t}" for m in ("leakage", "random") for t in texts), "paraphrase"):
            row[key] = sum(float(row[f"{key}_layer{layer}"]) for layer in layers) / len(layers)
        rows.append(row)
        print(
            f"{name:36s} leakage fixed {row['leakage_fixed'] * 1e3:.3f}e-3 "
            f"held-out {row['leakage_heldout'] * 1e3:.3f}e-3 "
            f"paraphrase {row['paraphrase']:.3f}; against a random direction "
            f"fixed {row['random_fixed']:.2f}× held-out {row['random_heldout']:.2f}×",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "records": [args.offset, args.offset + args.n],
        "layers": layers,
        "weight": args.weight,
        "alpha": args.alpha,
        "rows": rows,
    }
    (args.out / "leakage.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for j, text in enumerate(texts):
        ax.barh(
            [i + j * width for i in range(len(rows))],
            [float(r[f"leakage_{text}"]) * 1e3 for r in rows],  # type: ignore[arg-type]
            height=width,
            label=f"{text} text",
        )
    ax.set_yticks([i + width / 2 for i in range(len(rows))], [str(r["prior"]) for r in rows])
    ax.set_xlabel("leakage uᵀC_text·u / (uᵀk)²  (×1e-3, lower is better)")
    ax.legend()
    save_figure(fig, args.out / "leakage.png")


if __name__ == "__main__":
    main()
