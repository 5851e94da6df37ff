"""Model health after an edit: canary facts the base model knows, and perplexity on fixed text.

Both are cheap on purpose (one batched forward for the canaries, one window of fixed text) so
the worker can afford them after every edit: they guard against an edit that damages what the
model already knew, and their values per version feed the dashboard's health plot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.batch import build_batch
from workers.editing.evaluate import DATA_DIR, _can_split_head, greedy_generations, perplexity
from workers.editing.requests import as_answer
from workers.editing.scoring import target_logprobs

DEFAULT_CANARIES = DATA_DIR / "canaries.json"


@dataclass(frozen=True)
class Canary:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Health:
    canary_accuracy: float
    canaries_correct: tuple[bool, ...]
    perplexity: float

    def public(self) -> dict[str, object]:
        out = asdict(self)
        out["canaries_correct"] = list(self.canaries_correct)
        return out


def load_canaries(path: Path | str = DEFAULT_CANARIES) -> list[Canary]:
    """``[{"prompt": ..., "answer": ...}, ...]``; refuses a file it cannot use, naming why."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read canaries ({error})") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: must be a non-empty JSON list of {{prompt, answer}}")
    canaries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) and item[k].strip() for k in ("prompt", "answer")
        ):
            raise ValueError(f"{path}: item {i} needs non-empty string prompt and answer")
        canaries.append(Canary(item["prompt"], item["answer"]))
    return canaries


@torch.no_grad()
def canaries_correct(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, canaries: Sequence[Canary]
) -> list[bool]:
    """A canary is answered when the answer's first token is the model's top prediction."""
    device = next(model.parameters()).device
    batch = build_batch(
        tokenizer, [c.prompt for c in canaries], [as_answer(c.answer) for c in canaries]
    ).to(device)
    rows = torch.arange(len(canaries), device=device)
    if _can_split_head(model):  # the vocabulary projection only where it is read: 1/n the cost
        hidden = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        logits = model.get_output_embeddings()(hidden[rows, batch.last_prompt_pos()])
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = out[rows, batch.last_prompt_pos()]
    predicted = logits.argmax(dim=-1).tolist()
    return [p == t[0] for p, t in zip(predicted, batch.target_ids, strict=True)]


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    canaries: Sequence[Canary],
    *,
    text_tokens: int,
) -> Health:
    correct = canaries_correct(model, tokenizer, canaries)
    return Health(
        canary_accuracy=sum(correct) / len(correct),
        canaries_correct=tuple(correct),
        perplexity=perplexity(model, tokenizer, window=text_tokens, max_tokens=text_tokens),
    )


def guard_problem(
    before: Health, after: Health, *, max_canaries_broken: float, max_perplexity_ratio: float
) -> str | None:
    """Why the edit from ``before`` to ``after`` damaged the model too much, or None."""
    known = [i for i, ok in enumerate(before.canaries_correct) if ok]
    broken = [i for i in known if not after.canaries_correct[i]]
    if known and len(broken) / len(known) > max_canaries_broken:
        return (
            f"edit broke {len(broken)} of {len(known)} canary facts "
            f"({len(broken) / len(known):.0%} > {max_canaries_broken:.0%} allowed)"
        )
    ratio = after.perplexity / before.perplexity
    if ratio > max_perplexity_ratio:
        return (
            f"edit raised fixed-text perplexity {before.perplexity:.3f} → {after.perplexity:.3f} "
            f"(×{ratio:.3f} > ×{max_perplexity_ratio:.3f} allowed)"
        )
    return None


@dataclass(frozen=True)
class Probe:
    """How the model answers one edit's prompt: scored on its target and greedily generated."""

    target_logprob: float
    truth_logprob: float | None
    efficacy: bool | None  # P(target_new) > P(ground_truth); None without a ground truth
    generation: str


def probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    truths: Sequence[str | None],
    *,
    max_new_tokens: int,
) -> list[Probe]:
    pairs_p = list(prompts) + [p for p, t in zip(prompts, truths, strict=True) if t]
    pairs_t = [as_answer(t) for t in targets] + [as_answer(t) for t in truths if t]
    logprobs = target_logprobs(model, tokenizer, pairs_p, pairs_t)
    texts = greedy_generations(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    truth_lp = iter(logprobs[len(prompts) :])
    out = []
    for i, (prompt, truth) in enumerate(zip(prompts, truths, strict=True)):
        new = logprobs[i]
        old = next(truth_lp) if truth else None
        out.append(
            Probe(
                target_logprob=round(new, 4),
                truth_logprob=None if old is None else round(old, 4),
                efficacy=None if old is None else new > old,
                generation=texts[i][len(prompt) :],
            )
        )
    return out
