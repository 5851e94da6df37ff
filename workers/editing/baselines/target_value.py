"""v*: the residual-stream value at the subject's last token that makes the model say the target
(MEMIT's ``compute_z``), shared by MEMIT and AlphaEdit.

A free vector δ is added to the output of block ``z_layer`` at the subject's last token of every
prompt; Adam tunes it so the target becomes likely after the prompt in every context, while a
KL term on "{subject} is a" keeps the subject's other properties and a decay term keeps δ small.
The weight updates are then solved so the MLP keys produce ``h + δ`` by themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.arch import block
from workers.editing.baselines.config import TargetValueConfig
from workers.editing.baselines.hooks import frozen, logits_at, output_hooks
from workers.editing.baselines.keys import contextual_prompts
from workers.editing.baselines.targets import TargetIndex
from workers.editing.batch import build_batch
from workers.editing.requests import EditRequest

KL_TEMPLATE = "{} is a"


@dataclass
class TargetValues:
    z: torch.Tensor  # (n_requests, d_model) wanted block output at the subject's last token
    initial: torch.Tensor  # (n_requests, d_model) its value before the edit
    steps: int  # Adam updates of δ
    nll: float  # mean target NLL per token at the last step
    loss: float


def optimise_target_values(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    z_layer: int,
    contexts: Sequence[str],
    config: TargetValueConfig,
) -> TargetValues:
    """All requests at once, one δ each; their losses are independent, so this equals MEMIT's
    per-request loop except that the early stop waits for the slowest request."""
    device = next(model.parameters()).device
    n_req, n_ctx = len(requests), len(contexts)
    prompts = contextual_prompts(requests, contexts)
    n_rewrite = len(prompts)
    prompts += [KL_TEMPLATE.format(req.subject) for req in requests]
    targets = [req.target for req in requests for _ in contexts] + [""] * n_req
    subjects = [req.subject for req in requests for _ in contexts] + [r.subject for r in requests]
    batch = build_batch(tokenizer, prompts, targets, subjects).to(device)

    owner = torch.cat([torch.arange(n_req).repeat_interleave(n_ctx), torch.arange(n_req)])
    owner = owner.to(device)
    rows = torch.arange(len(prompts), device=device)
    subject_pos = torch.tensor(batch.subject_last, device=device)
    # MEMIT reads the KL distribution at the subject's last token of "{subject} is a" (the
    # prediction right after the subject), not after "a"; kept for fidelity to the baseline.
    kl_rows = rows[n_rewrite:]
    kl_pos = subject_pos[n_rewrite:]
    index = TargetIndex.of(batch, extra=kl_pos)
    kl_cols = index.column_of(kl_pos)
    bare_rows = torch.arange(n_req, device=device) * n_ctx

    d_model = int(model.config.hidden_size)
    delta = torch.zeros(n_req, d_model, device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def add_delta(_x: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        if "initial" not in state:
            state["initial"] = hidden[bare_rows, subject_pos[bare_rows]].detach().float()
        shift = torch.zeros_like(hidden)
        shift[rows, subject_pos] = delta[owner].to(hidden.dtype)
        return hidden + shift

    opt = torch.optim.Adam([delta], lr=config.lr)
    kl_init: torch.Tensor | None = None
    nll_value, loss_value, steps = float("nan"), float("nan"), 0
    with frozen(model), output_hooks({block(model, z_layer): add_delta}):
        for step in range(config.steps):
            opt.zero_grad()
            logits = logits_at(model, batch, index.positions)
            token_lp, _ = index.token_logprobs(logits)
            nll_rows = -index.row_mean(token_lp)[:n_rewrite].view(n_req, n_ctx)
            nll = nll_rows.mean(dim=1)
            kl_lp = torch.log_softmax(logits[kl_rows, kl_cols].float(), dim=-1)
            if kl_init is None:
                kl_init = kl_lp.detach()
            kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(dim=-1)
            initial = state["initial"]
            decay = delta.norm(dim=-1) / initial.norm(dim=-1) ** 2
            losses = nll + config.kl_factor * kl + config.weight_decay * decay
            nll_value, loss_value = float(nll.detach().mean()), float(losses.detach().mean())
            if bool((losses < config.loss_stop).all()) or step == config.steps - 1:
                steps = step  # Adam updates made, as FT-L counts them
                break
            losses.sum().backward()
            opt.step()
            with torch.no_grad():
                limit = config.clamp_norm_factor * initial.norm(dim=-1, keepdim=True)
                norm = delta.norm(dim=-1, keepdim=True)
                delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))
    initial = state["initial"]
    return TargetValues(
        z=(initial + delta.detach()).float(),
        initial=initial,
        steps=steps,
        nll=nll_value,
        loss=loss_value,
    )
