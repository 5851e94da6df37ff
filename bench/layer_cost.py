"""What one edit costs the model's perplexity, by the layer that makes it.

    python -m bench.layer_cost --n 10 --layers 1-8 --threads 1 --out results/layer-cost/

For each layer, each of N CounterFact records is edited on the unedited model by LOKI restricted
to that one layer, with the whole v* delivered (``exact_fit``), so every layer makes a complete
edit. The change is held on the side (never applied for good) while perplexity is measured on
the fixed text. Writes ``layer-cost.json`` and ``layer-cost.png``: the mean perplexity increase
per edit, ‖ΔW‖ and the success rate per layer. The candidate-layer default rests on this.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.cli import COUNTERFACT, add_threads, use_threads
from bench.plots import pyplot, save_figure
from workers.editing.datasets import load_records
from workers.editing.evaluate import perplexity
from workers.editing.hooks import applied
from workers.editing.loki import LokiConfig, LokiEditor
from workers.editing.model import load_model


def parse_layers(text: str) -> list[int]:
    """ "1-8" or "3,4,6" → layer indices."""
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            layers += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"layers: cannot read {text!r}") from None
    return layers


def plot(path: Path, per_layer: dict[int, dict[str, float]]) -> None:
    plt = pyplot()

    layers = sorted(per_layer)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(x) for x in layers], [per_layer[x]["ppl_increase"] for x in layers])
    ax.set_xlabel("edited layer (down_proj)")
    ax.set_ylabel("perplexity increase per edit")
    ax.set_title("Cost of one complete edit, by layer")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m bench.layer_cost", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", default=COUNTERFACT)
    p.add_argument("--n", type=int, default=10, help="records edited per layer")
    p.add_argument("--layers", type=parse_layers, default=parse_layers("1-8"))
    p.add_argument("--ppl-tokens", type=int, help="score only the fixed text's first tokens")
    add_threads(p)
    p.add_argument("--out", type=Path, default=Path("results/layer-cost"))
    args = p.parse_args(argv)
    use_threads(args)

    lm = load_model()
    model, tokenizer = lm.model, lm.tokenizer
    records = load_records(args.data, n=args.n)
    base = perplexity(model, tokenizer, max_tokens=args.ppl_tokens)
    per_layer: dict[int, dict[str, float]] = {}
    bar = tqdm(total=len(args.layers) * len(records), unit="edit", desc="layer cost")
    for layer in args.layers:
        config = LokiConfig(candidate_layers=(layer,), top_k=1, exact_fit=True)
        editor = LokiEditor(model, tokenizer, config)
        increases, norms, hits = [], [], []
        for record in records:
            result = editor.compute([record.request])
            with applied(model, {layer: result.deltas[0]}):
                increases.append(perplexity(model, tokenizer, max_tokens=args.ppl_tokens) - base)
            norms.append(result.deltas[0].norm())
            hits.append(result.success)
            bar.update()
        per_layer[layer] = {
            "ppl_increase": statistics.mean(increases),
            "delta_norm": statistics.mean(norms),
            "success": sum(hits) / len(hits),
        }
        bar.write(
            f"layer {layer}: " + ", ".join(f"{k} {v:.4f}" for k, v in per_layer[layer].items())
        )
    bar.close()
    summary = {"model": lm.name, "n": len(records), "perplexity": base, "layers": per_layer}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer-cost.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot(args.out / "layer-cost.png", per_layer)
    return summary


if __name__ == "__main__":
    main()
