"""How well each null space separates ordinary text from the keys edits write to.

    python -m bench.keyspace --out results/keyspace.json

For layers 3–8 of the model, reads the down-projection keys of ``fixed_text.txt`` (the
perplexity text) and of the subjects' last tokens in ``--n`` CounterFact prompts, and reports
for each protected subspace the share of each key set's energy it leaves editable. An edit
moves ordinary text in proportion to the first, and needs the second to be large: their ratio
(selectivity) is what a projector buys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.cli import COUNTERFACT
from workers.editing.arch import down_proj
from workers.editing.datasets import load_records
from workers.editing.evaluate import fixed_text
from workers.editing.keys import read_at_subject, read_text_keys
from workers.editing.model import load_model
from workers.editing.nullspace import energy_basis, orthonormal_extend, weight_input_basis
from workers.editing.stats import key_second_moments

LAYERS = (3, 4, 5, 6, 7, 8)


def editable_share(basis: torch.Tensor, keys: torch.Tensor) -> float:
    """‖k − QQᵀk‖² / ‖k‖² summed over the rows of ``keys``."""
    q, k = basis.double(), keys.double()
    return float(((k - (k @ q) @ q.T).norm() / k.norm()) ** 2)


def eigen_basis(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's protected directions: eigenvectors of E[kkᵀ] with eigenvalue ≥ threshold."""
    eigvals, eigvecs = torch.linalg.eigh(moment.double())
    return eigvecs[:, eigvals >= threshold].float()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.keyspace", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=COUNTERFACT)
    p.add_argument("--n", type=int, default=60, help="CounterFact records for subject keys")
    p.add_argument("--out", type=Path, default=Path("results/keyspace.json"))
    args = p.parse_args(argv)

    lm = load_model()
    model, tokenizer = lm.model, lm.tokenizer
    modules = {layer: down_proj(model, layer) for layer in LAYERS}
    text = read_text_keys(model, tokenizer, fixed_text(), LAYERS, window=256)
    requests = [r.request for r in load_records(args.data, n=args.n)]
    subject = read_at_subject(model, tokenizer, requests, ["{}"], LAYERS).keys
    own = key_second_moments(model, tokenizer, LAYERS, max_tokens=4096, source="self")
    prose = key_second_moments(model, tokenizer, LAYERS)
    # everything on the CPU: the moments are stored there, and the sizes are small
    subject = {layer: keys.cpu() for layer, keys in subject.items()}

    rows = []
    for layer in LAYERS:
        w0 = weight_input_basis(modules[layer].weight.cpu(), 0.05)
        spaces = {
            "W0 row space (LOKI)": w0,
            "W0 + self-sampled 80%": orthonormal_extend(w0, energy_basis(own[layer], 0.8).T, 0.05),
            "W0 + self-sampled 90%": orthonormal_extend(w0, energy_basis(own[layer], 0.9).T, 0.05),
            "AlphaEdit K0 (prose, eig >= 1e-2)": eigen_basis(prose[layer], 1e-2),
        }
        for name, basis in spaces.items():
            t, s = editable_share(basis, text[layer]), editable_share(basis, subject[layer])
            rows.append(
                {
                    "layer": layer,
                    "space": name,
                    "dims": int(basis.shape[1]),
                    "text_editable": round(t, 3),
                    "subject_editable": round(s, 3),
                    "selectivity": round(s / t, 3),
                }
            )
            print(
                f"layer {layer} {name:36s} dims {basis.shape[1]:5d} text {t:.2f} "
                f"subject {s:.2f} selectivity {s / t:.2f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
