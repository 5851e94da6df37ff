"""MLP keys at the subject's last token, and the residual stream there (MEMIT's ``compute_ks``
and ``get_module_input_output_at_words``), read in one truncated forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.arch import block, down_proj
from workers.editing.batch import build_batch
from workers.editing.hooks import forward_until, hidden_of, read_inputs
from workers.editing.requests import EditRequest


@dataclass
class SubjectReadout:
    keys: dict[int, torch.Tensor]  # layer -> (n_requests, d_ff), averaged over contexts
    residual: torch.Tensor | None  # (n_requests, d_model) block output on the bare prompt


def contextual_prompts(requests: Sequence[EditRequest], contexts: Sequence[str]) -> list[str]:
    """Request-major: row ``r * len(contexts) + c`` is request r in context c."""
    return [ctx.replace("{}", req.text) for req in requests for ctx in contexts]


@torch.no_grad()
def read_at_subject(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layers: Sequence[int],
    residual_layer: int | None = None,
) -> SubjectReadout:
    """Keys at ``layers`` averaged as MEMIT does, plus the residual after ``residual_layer``.

    ``contexts[0]`` must be the bare ``"{}"``. MEMIT averages per context *type*: the bare
    prompt counts as much as all generated prefixes together, so the key stays anchored to the
    prompt the operator wrote.
    """
    if contexts[0] != "{}":
        raise ValueError("contexts: the first context must be the bare prompt '{}'")
    device = next(model.parameters()).device
    prompts = contextual_prompts(requests, contexts)
    subjects = [req.subject for req in requests for _ in contexts]
    batch = build_batch(tokenizer, prompts, [""] * len(prompts), subjects).to(device)
    rows = torch.arange(len(prompts), device=device)
    pos = torch.tensor(batch.subject_last, device=device)

    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    deepest = max([*layers, -1 if residual_layer is None else residual_layer])
    modules = {layer: down_proj(model, layer) for layer in layers}
    with read_inputs(modules, inputs):
        if residual_layer is None:
            forward_until(model, batch, down_proj(model, deepest))
        else:
            handle = block(model, residual_layer).register_forward_hook(
                lambda _m, _a, out: outputs.__setitem__(0, hidden_of(out).detach())
            )
            try:
                forward_until(model, batch, block(model, deepest))
            finally:
                handle.remove()

    n_ctx = len(contexts)
    keys: dict[int, torch.Tensor] = {}
    for layer in layers:
        per_row = inputs[layer][rows, pos].float().view(len(requests), n_ctx, -1)
        bare = per_row[:, 0]
        keys[layer] = bare if n_ctx == 1 else (bare + per_row[:, 1:].mean(dim=1)) / 2
    residual = None
    if residual_layer is not None:
        residual = outputs[0][rows, pos].float().view(len(requests), n_ctx, -1)[:, 0]
    return SubjectReadout(keys=keys, residual=residual)


@torch.no_grad()
def read_text_keys(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    layers: Sequence[int],
    *,
    window: int,
    max_tokens: int | None = None,
) -> dict[int, torch.Tensor]:
    """layer → the down-projection inputs of every token of ``text`` (tokens × d_ff, fp32, CPU),
    the text read in consecutive windows of ``window`` tokens on the model as it is now."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    modules = {layer: down_proj(model, layer) for layer in layers}
    store: dict[int, torch.Tensor] = {}
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    device = next(model.parameters()).device
    with read_inputs(modules, store):
        for start in range(0, len(ids), window):
            model(input_ids=torch.tensor([ids[start : start + window]], device=device))
            for layer in layers:
                keys[layer].append(store[layer][0].float().cpu())
    return {layer: torch.cat(parts) for layer, parts in keys.items()}
