"""How much ordinary text's predictions move when the residual stream moves, per layer.

Every LOKI edit is a rank-one change ΔW = r·bᵀ of a down-projection, so an ordinary token whose
key reads b is pushed along r, the direction of v* − h. Not every residual direction matters as
much to what the model predicts next: to second order the damage to text is ½·rᵀFr per unit of
bᵀk, where F is the Fisher information of the text with respect to the block's output. Text
the model samples itself (``workers.editing.selftext``) is drawn from the model's own
distribution, so the outer product of its log-likelihood gradients estimates F without a corpus.

On SmolLM2 at layers 3–6 (4k self-sampled tokens) F is uneven but far from degenerate: 90% of
its trace lies in ~380 of 576 directions, and the v* directions of 100 unpenalised CounterFact
edits were 1.02–1.14× as sensitive as an average direction. Used as a penalty on v*
(``TargetValueConfig.sensitivity_weight``) it did not lower perplexity after 200 edits
(docs/loki-log.md, "A sensitivity penalty on v*"), so LOKI leaves it off.

The result is normalised to mean eigenvalue 1 (trace = d_model), so rᵀF̂r/‖r‖² is "times as
sensitive as an average direction", and cached in ``var/stats`` like the key statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.hooks import frozen
from workers.editing.selftext import self_text_chunks, self_text_id, self_text_length
from workers.editing.stats import default_stats_dir, model_key, read_cached, save_atomic

DEFAULT_TOKENS = 4096


def _fisher(
    model: PreTrainedModel, chunks: Sequence[list[int]], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Σ over chunks of g·gᵀ at each token, g = ∂ log p(chunk)/∂(output of block ``layer``)."""
    device = next(model.parameters()).device
    d_model = int(model.config.hidden_size)
    sums = {layer: torch.zeros(d_model, d_model, dtype=torch.float64) for layer in layers}
    embed = model.get_input_embeddings()
    with frozen(model):
        for chunk in chunks:
            ids = torch.tensor([chunk], device=device)
            # the weights need no gradient: the graph starts at the embeddings instead
            emb = embed(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
            nll = torch.nn.functional.cross_entropy(
                out.logits[0, :-1].float(), ids[0, 1:], reduction="sum"
            )
            grads = torch.autograd.grad(nll, [out.hidden_states[layer + 1] for layer in layers])
            for layer, grad in zip(layers, grads, strict=True):
                g = grad[0, :-1].double().cpu()  # the last token predicts nothing scored
                sums[layer] += g.T @ g
    return {layer: (s * (d_model / float(torch.trace(s)))).float() for layer, s in sums.items()}


def residual_fisher(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    *,
    max_tokens: int = DEFAULT_TOKENS,
    cache_dir: Path | None = None,
) -> dict[int, torch.Tensor]:
    """layer -> F̂ (d_model × d_model, fp32, CPU, trace d_model) of self-sampled text at the
    output of block ``layer``, read from ``var/stats`` when cached there."""
    root = cache_dir or default_stats_dir()
    # the openings, whatever LOKI's self_text_style: the penalty is off, and its figures were
    # read on them
    name, sha = model_key(model), self_text_id()
    n_tokens = self_text_length(tokenizer, max_tokens)
    path = {layer: root / f"{name}-fisher-layer{layer}-n{n_tokens}.safetensors" for layer in layers}
    cached = {layer: read_cached(p, sha) for layer, p in path.items()}
    out = {layer: fisher for layer, fisher in cached.items() if fisher is not None}
    missing = [layer for layer in layers if layer not in out]
    if missing:
        chunks = self_text_chunks(model, tokenizer, max_tokens)
        root.mkdir(parents=True, exist_ok=True)
        for layer, fisher in _fisher(model, chunks, missing).items():
            save_atomic(path[layer], fisher, {"tokens": str(n_tokens), "text_sha256": sha})
            out[layer] = fisher
    return out
