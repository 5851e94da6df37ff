"""How far the fluency ratio moves when the model's knowledge does not: random weight noise.

    python -m bench.fluency_noise --scale 0.25 --seeds 8 --threads 1 --out results/fluency-noise/

Fluency is the mean n-gram entropy of greedy generations, and greedy decoding is chaotic: a tiny
change of the weights flips one token, and the rest of a 100-token text follows another path —
into a repetition loop or out of one. Each seed adds Gaussian noise with ‖N‖ = scale·‖W₀‖ to the
down-projection of every LOKI candidate layer (no edit, no direction that means anything), then
reads fluency on the first 25 prompts (the set figures were read on until session 13) and on all
of them, and perplexity on the fixed text. The spread of the ratios across seeds is how much a
fluency figure can move for reasons that have nothing to do with the edits. ``--layer-scales``
gives each layer its own scale, e.g. the relative change a run's edits left there: what noise
of the edits' own size costs. Writes ``fluency-noise.json`` (with each seed's per-prompt
entropies, for ``bench.fluency_flips``) and ``fluency-noise.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.cli import add_threads, use_threads
from bench.editing import FIRST_PROMPTS, Evaluator, stored_entropies
from bench.plots import pyplot, save_figure
from workers.editing import arch
from workers.editing.evaluate import perplexity
from workers.editing.loki import LokiConfig
from workers.editing.model import load_model


def plot(path: Path, runs: list[dict[str, Any]]) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("ratio_first", f"first {FIRST_PROMPTS} prompts"), ("ratio", "all")):
        ax.scatter([r["ppl_ratio"] for r in runs], [r[key] for r in runs], label=label)
    ax.axhline(0.98, color="grey", linestyle="--", linewidth=1, label="0.98× target")
    ax.set_xlabel("perplexity ratio (fixed text)")
    ax.set_ylabel("fluency ratio")
    ax.set_title("Random noise on the edited layers, one point per seed")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=0.25, help="‖noise‖ / ‖W₀‖ per layer")
    p.add_argument(
        "--layer-scales",
        help="one scale per candidate layer, comma-separated, instead of --scale: e.g. the "
        "relative change ‖W − W₀‖/‖W₀‖ a run's edits left in each layer",
    )
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--prompts", type=int, help="use only the first N fluency prompts")
    p.add_argument("--tokens", type=int, default=100, help="greedy tokens per prompt")
    p.add_argument("--ppl-tokens", type=int, help="score only the fixed text's first N tokens")
    p.add_argument("--model", default="bundled")
    p.add_argument("--out", type=Path, default=Path("results/fluency-noise"))
    add_threads(p)
    args = p.parse_args(argv)
    if args.scale <= 0 or args.seeds < 2:
        p.error("--scale must be positive and --seeds at least 2")
    use_threads(args)
    args.out.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    evaluator = Evaluator.for_fluency(model, tok, tokens=args.tokens, prompts=args.prompts)
    prompts = evaluator.prompts
    layers = LokiConfig().resolve_layers(arch.num_layers(model))
    scales = [args.scale] * len(layers)
    if args.layer_scales:
        try:
            scales = [float(x) for x in args.layer_scales.split(",")]
        except ValueError:
            p.error(f"--layer-scales {args.layer_scales!r}: expected numbers separated by commas")
        if len(scales) != len(layers) or min(scales) <= 0:
            p.error(f"--layer-scales: need {len(layers)} positive scales, one per layer {layers}")
    weights = [arch.down_proj(model, layer).weight for layer in layers]
    originals = [w.detach().clone() for w in weights]
    base = evaluator.entropies(full=True)
    base_ppl = perplexity(model, tok, max_tokens=args.ppl_tokens)
    first = min(FIRST_PROMPTS, len(prompts))

    runs: list[dict[str, Any]] = []
    try:
        for seed in tqdm(range(args.seeds), desc="noise seeds", unit="seed"):
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for w, w0, scale in zip(weights, originals, scales, strict=True):
                    noise = torch.randn(w0.shape, generator=gen).to(w0)
                    w.copy_(w0 + noise * (scale * w0.norm() / noise.norm()))
            got = evaluator.entropies(full=True)
            runs.append(
                {
                    "seed": seed,
                    "ratio": statistics.fmean(got) / statistics.fmean(base),
                    "ratio_first": statistics.fmean(got[:first]) / statistics.fmean(base[:first]),
                    "ppl_ratio": perplexity(model, tok, max_tokens=args.ppl_tokens) / base_ppl,
                    "entropies": stored_entropies(got),  # for bench.fluency_flips
                }
            )
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, originals, strict=True):
                w.copy_(w0)

    result = {
        "model": loaded.name,
        "layers": list(layers),
        "scale": args.scale if not args.layer_scales else None,
        "layer_scales": dict(zip(map(str, layers), scales, strict=True)),
        "prompts": len(prompts),
        "tokens": args.tokens,
        "unedited": {
            "fluency": statistics.fmean(base),
            "perplexity": base_ppl,
            "fluency_entropies": stored_entropies(base),
        },
        # read once the noise is taken off again: equal to the unedited figure
        "perplexity_restored": perplexity(model, tok, max_tokens=args.ppl_tokens),
        "fluency_ratio": spread([r["ratio"] for r in runs]),
        f"fluency_ratio_first{first}": spread([r["ratio_first"] for r in runs]),
        "perplexity_ratio": spread([r["ppl_ratio"] for r in runs]),
        "runs": runs,
    }
    (args.out / "fluency-noise.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot(args.out / "fluency-noise.png", runs)
    shown = {k: v for k, v in result.items() if k != "runs"}
    shown["unedited"] = {k: v for k, v in result["unedited"].items() if k != "fluency_entropies"}
    print(json.dumps(shown, indent=2))
    return result


if __name__ == "__main__":
    main()
