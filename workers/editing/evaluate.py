"""Edit quality as DESIGN §4 defines it: efficacy, generalisation, specificity, fluency, perplexity.

The three edit metrics compare mean per-token log-probabilities, exactly what
``scoring.target_logprobs`` returns. They are computed here by an equivalent but cheaper route:
each prompt is run once for all of its targets, and the vocabulary projection is applied only
at the positions that predict target tokens. On CounterFact that is about a third of the
compute, which keeps a 200-record evaluation around 20 CPU-seconds.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.batch import encode, left_padded
from workers.editing.datasets import EvalRecord
from workers.editing.requests import as_answer
from workers.editing.scoring import target_logprobs

DATA_DIR = Path(__file__).parent / "data"
EDIT_METRICS = ("efficacy", "generalization", "specificity")


# ---------------------------------------------------------------- target log-probabilities


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    # same tokenisation as batch.build_batch: prompt and target separately, no special tokens
    return tuple(encode(tokenizer, text))


def _can_split_head(model: PreTrainedModel) -> bool:
    """True when logits are exactly ``output_embeddings(base_model(x))``."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return model.base_model is not model and model.get_output_embeddings() is not None


@torch.no_grad()
def shared_prefix_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 64,
) -> list[float]:
    """Same values as ``target_logprobs`` (mean per-token log-prob of each target), faster.

    Scoring a target of k tokens needs the input ``prompt + target[:k-1]``; when that input is a
    prefix of another pair's input (always so for one-token targets after the same prompt) both
    are read from one row.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    if not _can_split_head(model):
        return target_logprobs(model, tokenizer, prompts, targets, batch_size=batch_size)
    cache_: dict[str, tuple[int, ...]] = {}

    def enc(text: str) -> tuple[int, ...]:
        if text not in cache_:
            cache_[text] = _encode(tokenizer, text)
        return cache_[text]

    pairs = [(enc(p), enc(t) if t else ()) for p, t in zip(prompts, targets, strict=True)]
    if any(not p for p, _ in pairs):
        raise ValueError("prompt: tokenises to nothing")

    # rows: maximal inputs, each shared by every pair whose input is a prefix of it
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (p, t) in enumerate(pairs):
        if t:
            by_prompt.setdefault(p, []).append(i)
    rows: list[tuple[int, ...]] = []
    row_of: dict[int, int] = {}
    for p, members in by_prompt.items():
        chosen: list[int] = []
        for i in sorted(members, key=lambda i: -len(pairs[i][1])):
            need = p + pairs[i][1][:-1]
            hit = next((r for r in chosen if rows[r][: len(need)] == need), None)
            if hit is None:
                rows.append(need)
                hit = len(rows) - 1
                chosen.append(hit)
            row_of[i] = hit

    pair_rows: dict[int, list[int]] = {}
    for i, r in row_of.items():
        pair_rows.setdefault(r, []).append(i)
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = [0.0] * len(pairs)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))  # similar lengths, little padding
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[r]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        b_idx, pos, tok, owner = [], [], [], []
        for b, r in enumerate(chunk):
            ids[b, : len(rows[r])] = torch.tensor(rows[r])
            mask[b, : len(rows[r])] = 1
            for i in pair_rows[r]:
                p, t = pairs[i]
                for j, token in enumerate(t):
                    b_idx.append(b)
                    pos.append(len(p) - 1 + j)
                    tok.append(token)
                    owner.append(i)
        hidden = model.base_model(
            input_ids=ids.to(device), attention_mask=mask.to(device)
        ).last_hidden_state
        picked = hidden[torch.tensor(b_idx, device=device), torch.tensor(pos, device=device)]
        logp = torch.log_softmax(head(picked).float(), dim=-1)
        token_lp = logp[torch.arange(len(tok), device=device), torch.tensor(tok, device=device)]
        for i, value in zip(owner, token_lp.tolist(), strict=True):
            sums[i] += value
    return [s / max(len(t), 1) for s, (_, t) in zip(sums, pairs, strict=True)]


# ---------------------------------------------------------------- edit metrics


@dataclass(frozen=True)
class RecordScores:
    """Mean per-token log-probs for one record; the metrics are comparisons between them."""

    case_id: str
    new_on_prompt: float
    truth_on_prompt: float
    new_on_rephrase: float
    truth_on_rephrase: float
    new_on_locality: float
    truth_on_locality: float

    @property
    def efficacy(self) -> bool:
        return self.new_on_prompt > self.truth_on_prompt

    @property
    def generalization(self) -> bool:
        return self.new_on_rephrase > self.truth_on_rephrase

    @property
    def specificity(self) -> bool:
        return self.truth_on_locality > self.new_on_locality


def edit_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecord],
    *,
    batch_size: int = 64,
) -> list[RecordScores]:
    prompts: list[str] = []
    targets: list[str] = []
    for rec in records:
        new, truth, loc_truth = (
            as_answer(rec.target_new),
            as_answer(rec.ground_truth),
            as_answer(rec.locality_ground_truth),
        )
        prompts += [rec.prompt, rec.prompt, rec.rephrase_prompt, rec.rephrase_prompt]
        targets += [new, truth, new, truth]
        prompts += [rec.locality_prompt, rec.locality_prompt]
        targets += [new, loc_truth]
    lp = shared_prefix_logprobs(model, tokenizer, prompts, targets, batch_size=batch_size)
    return [RecordScores(rec.case_id, *lp[6 * k : 6 * k + 6]) for k, rec in enumerate(records)]


def edit_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EvalRecord],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """Efficacy, generalization, specificity: fractions of records in [0, 1]."""
    if not records:
        raise ValueError("records: at least one is required")
    return summarise_scores(edit_scores(model, tokenizer, records, batch_size=batch_size))


def summarise_scores(scores: Sequence[RecordScores]) -> dict[str, float]:
    """The fraction of records each metric holds for, and their number."""
    out = {m: sum(getattr(s, m) for s in scores) / len(scores) for m in EDIT_METRICS}
    out["n"] = len(scores)
    return out


def record_outcomes(scores: Sequence[RecordScores]) -> dict[str, list]:
    """Per record, whether each metric holds (1/0), with the case ids: what a paired comparison
    of two runs on the same records needs."""
    out: dict[str, list] = {"case_id": [s.case_id for s in scores]}
    for m in EDIT_METRICS:
        out[m] = [int(getattr(s, m)) for s in scores]
    return out


# ---------------------------------------------------------------- fluency


_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    """Word and punctuation tokens, close to nltk.word_tokenize (which ROME uses)."""
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME/MEMIT ``compute_n_gram_entropy``: the mean of ``weight_n * H_n`` (bits) over ns.

    With the defaults this is ``(2/3*H2 + 4/3*H3) / 2``; ROME reports it x100 as "fluency".
    An order with no n-grams (text too short) contributes 0.
    """
    tokens = words(text)
    terms = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * h)
    return sum(terms) / len(terms)


@cache
def _lines(name: str) -> tuple[str, ...]:
    text = (DATA_DIR / name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def fluency_prompts() -> list[str]:
    return list(_lines("fluency_prompts.txt"))


def fixed_text() -> str:
    return (DATA_DIR / "fixed_text.txt").read_text(encoding="utf-8")


def heldout_text() -> str:
    """A second perplexity text (~2k tokens, written for the project, mixed registers) that no
    method reads: the drift of one text is dominated by a few edits meeting a few of its tokens
    (loki-log.md, "A smaller v* spends less"), so one text alone can flatter or wrong a method.
    k0_text.txt would not do: MEMIT and AlphaEdit protect exactly that text."""
    return (DATA_DIR / "heldout_text.txt").read_text(encoding="utf-8")


PERPLEXITY_TEXTS = {"fixed": fixed_text, "heldout": heldout_text}


@torch.no_grad()
def greedy_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    batch_size: int = 16,
) -> list[str]:
    """Prompt + exactly ``max_new_tokens`` greedy tokens each, generated in left-padded batches.

    EOS is held off until the length is reached, so every text is the same length and entropies
    are comparable across models (ROME's generator also runs to a fixed length).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_padded([_encode(tokenizer, p) for p in chunk], pad)
        width = ids.shape[1]
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for prompt, row in zip(chunk, generated[:, width:], strict=True):
            out.append(prompt + tokenizer.decode(row, skip_special_tokens=True))
    return out


def fluency(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 100,
    batch_size: int = 16,
) -> float:
    """Mean n-gram entropy of greedy generations; falls as an edited model starts to repeat."""
    prompts = list(prompts) if prompts is not None else fluency_prompts()
    if not prompts:
        raise ValueError("prompts: at least one is required")
    texts = greedy_generations(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return sum(ngram_entropy(t) for t in texts) / len(texts)


# ---------------------------------------------------------------- perplexity


def scored_windows(n_ids: int, window: int) -> list[range]:
    """The consecutive windows ``token_nll`` scores: a window of one token predicts nothing."""
    spans = (range(start, min(start + window, n_ids)) for start in range(0, n_ids, window))
    return [span for span in spans if len(span) >= 2]


@torch.no_grad()
def token_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str | None = None,
    *,
    window: int = 512,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Next-token NLL of every scored token of ``text`` (default: the shipped fixed text), fp32.

    The text is cut into consecutive windows scored independently; the first token of each
    window has no context and is not scored. Deterministic, so figures compare across runs.
    ``max_tokens`` keeps only the text's first tokens (smoke runs).
    """
    text = fixed_text() if text is None else text
    ids = list(_encode(tokenizer, text))[:max_tokens]
    if len(ids) < 2:
        raise ValueError("text: needs at least two tokens")
    device = next(model.parameters()).device
    parts: list[torch.Tensor] = []
    for span in scored_windows(len(ids), window):
        x = torch.tensor([ids[span.start : span.stop]], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        parts.append(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").cpu())
    return torch.cat(parts)


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str | None = None,
    *,
    window: int = 512,
    max_tokens: int | None = None,
) -> float:
    """exp(mean next-token NLL) over ``text``, scored as ``token_nll`` scores it."""
    nll = token_nll(model, tokenizer, text, window=window, max_tokens=max_tokens)
    return math.exp(float(nll.double().mean()))
