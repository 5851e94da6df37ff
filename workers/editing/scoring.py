"""Log-probabilities of target continuations: the one measurement editors and evaluation share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.batch import build_batch


@torch.no_grad()
def target_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
) -> list[float]:
    """Mean per-token log-probability of each target after its prompt."""
    out: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        batch = build_batch(
            tokenizer, prompts[start : start + batch_size], targets[start : start + batch_size]
        ).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        rows, pos, ids = batch.flat_target_index()
        token_lp = logp[rows, pos, ids]
        sums = torch.zeros(len(batch.prompt_len), device=device).index_add_(0, rows, token_lp)
        counts = torch.tensor([max(len(t), 1) for t in batch.target_ids], device=device)
        out.extend((sums / counts).tolist())
    return out


@torch.no_grad()
def greedy_continuation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 8,
) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def answers_already(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
) -> list[bool]:
    """For each prompt, whether greedy decoding already produces its target (every target
    token is the argmax after the prompt and the target tokens before it)."""
    device = next(model.parameters()).device
    batch = build_batch(tokenizer, prompts, targets).to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows, pos, ids = batch.flat_target_index()
    hits = (logits[rows, pos].argmax(dim=-1) == ids).long()
    per_row = torch.zeros(len(prompts), dtype=torch.long, device=device).index_add_(0, rows, hits)
    needed = [len(t) for t in batch.target_ids]
    return [bool(n) and int(h) == n for h, n in zip(per_row.tolist(), needed, strict=True)]
