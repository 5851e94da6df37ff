"""Text the model writes itself, as token chunks: what "everything the model already does" looks
like when no corpus may be used.

LOKI's null space is computed from the model's own weights (DESIGN §3). W₀'s input row space
alone leaves ~60% of the key energy of ordinary prose editable on SmolLM2 (layers 3–8,
measured on ``fixed_text.txt``), so every edit leaks into ordinary text and perplexity drifts.
Sampling the model from a handful of generic openings and reading its MLP keys on its own
output needs nothing outside the weights either, and the dominant directions of those keys
cover prose as well as AlphaEdit's shipped-prose statistics do (17–19% editable against 13–39%).

Sampling is seeded, EOS is held off so every row has the same length, and both the sampled
tokens and the statistics read on them are cached on disk by ``workers.editing.stats``;
generation runs once per model (~35 s for 4k tokens on two CPU cores), whichever layers are
asked for later.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.batch import left_padded

log = logging.getLogger(__name__)

OPENINGS = (
    "The",
    "In",
    "Once upon a time",
    "The history of",
    "Scientists",
    "A recipe",
    "The city",
    "In 1850,",
    "My favourite",
    "The company",
    "According to",
    "The river",
    "Music",
    "The team",
    "During the war",
    "Today",
)
# "articles": the model is asked, through its chat template, for a short encyclopedia article
# on each topic, and only its answers are kept. An instruction-tuned model continues the bare
# openings above as chat ("A: I'm glad to hear..."); asked for articles it writes prose, whose
# keys are nearer ordinary text's. ``python -m bench.prior_leakage`` (SmolLM2, layers 3–6,
# subject keys of CounterFact records 2000–2099, λ = 300, α = 10) reads how far the ridge's input
# direction u = (λC + αI)⁻¹k moves ordinary text per unit delivered at k: held-out text 0.652e-3
# with 4k tokens of openings, 0.552e-3 with 8k of articles, 0.498e-3 with the baselines' shipped
# prose (no prior: 1.143e-3); fixed text 0.512e-3, 0.470e-3, 0.388e-3. u still answers the
# paraphrase's subject key as much (0.905, 0.903, 0.907 of the prompt's). 16k tokens of
# openings leaked more than 8k of articles (prototype: 0.606e-3 and 0.481e-3), and plain
# article prompts without the chat template no less than the openings. A model without a chat
# template falls back to the openings (``resolve_style``).
ARTICLE_TOPICS = (
    "the history of a European city",
    "a river in Asia",
    "a nineteenth-century scientist",
    "a popular sport",
    "a musical instrument",
    "a famous painting",
    "an international company",
    "a national park",
    "a programming language",
    "a Roman emperor",
    "a type of bird",
    "a football club",
    "a novel and its author",
    "a mountain range",
    "a religion",
    "an election",
)
ARTICLE_REQUEST = "Write a short encyclopedia article about {}."
STYLES = ("openings", "articles")
TOP_K = 50
MAX_ROW = 256
_VERSION = "1"  # bump when the sampling changes, so cached statistics are rebuilt


def check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"self_text_style: must be one of {STYLES}, got {style!r}")


def resolve_style(tokenizer: PreTrainedTokenizerBase, style: str) -> str:
    """The style that will be sampled: "articles" needs a chat template, else the openings."""
    check_style(style)
    if style == "articles" and not getattr(tokenizer, "chat_template", None):
        log.warning("self-text: the tokenizer has no chat template; sampling the openings")
        return "openings"
    return style


def self_text_id(seed: int = 0, style: str = "openings") -> str:
    """Identifies the sampling settings; stored with cached statistics."""
    check_style(style)
    if style == "articles":
        parts: tuple[str, ...] = ("articles", ARTICLE_REQUEST, *ARTICLE_TOPICS)
    else:  # as before articles existed, so the openings' cached statistics stay valid
        parts = OPENINGS
    spec = "|".join((_VERSION, str(seed), str(TOP_K), *parts))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _openings(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [list(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in OPENINGS]


def _article_requests(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    out = []
    for topic in ARTICLE_TOPICS:
        messages = [{"role": "user", "content": ARTICLE_REQUEST.format(topic)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _prompts(tokenizer: PreTrainedTokenizerBase, style: str) -> tuple[list[list[int]], bool]:
    """(prompt token ids, whether they are kept in the chunks) for a style ``resolve_style``
    returned. An article's request is left out: the chat template's tokens (a system prompt,
    role markers) are no ordinary text."""
    check_style(style)
    if style == "articles":
        return _article_requests(tokenizer), False
    return _openings(tokenizer), True


def _layout(max_tokens: int, n_prompts: int = len(OPENINGS)) -> tuple[int, int]:
    """(rows per opening, sampled tokens per row). A row is at most ``MAX_ROW`` tokens: sampling
    cost grows with a row's length, so more text means more rows (16k tokens took ~14 min as 16
    rows of 1,024 on two CPU cores). Up to 4k tokens this is one row per opening, as before."""
    rows = max(1, -(-max_tokens // (MAX_ROW * n_prompts)))
    return rows, max(1, max_tokens // (rows * n_prompts))


def self_text_length(
    tokenizer: PreTrainedTokenizerBase, max_tokens: int, style: str = "openings"
) -> int:
    """Tokens ``self_text_chunks`` returns: the sampled text, plus the openings it follows.
    ``style`` as ``resolve_style`` returned it."""
    prompts, kept = _prompts(tokenizer, style)
    rows, per_row = _layout(max_tokens, len(prompts))
    return rows * ((sum(len(e) for e in prompts) if kept else 0) + per_row * len(prompts))


@torch.no_grad()
def self_text_chunks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    seed: int = 0,
    style: str = "openings",
) -> list[list[int]]:
    """Chunks of sampled text, each prompt once per row (``_layout``), ``max_tokens`` sampled
    tokens in all: an opening and its continuation, or an article without its request.
    ``style`` as ``resolve_style`` returned it."""
    prompts, kept = _prompts(tokenizer, style)
    rows, per_row = _layout(max_tokens, len(prompts))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = prompts * rows
    ids, mask = left_padded(encoded, pad)
    width = ids.shape[1]
    log.info(
        "sampling %d tokens from the model for its key statistics (once per model)",
        per_row * len(encoded),
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            top_k=TOP_K,
            max_new_tokens=per_row,
            min_new_tokens=per_row,
            pad_token_id=pad,
        )
    return [(e if kept else []) + out[row, width:].tolist() for row, e in enumerate(encoded)]
