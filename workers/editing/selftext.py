"""Text the model writes itself, as token chunks: what "everything the model already does" looks
like when no corpus may be used.

LOKI's null space is computed from the model's own weights (DESIGN §3). W₀'s input row space
alone leaves ~60% of the key energy of ordinary prose editable on SmolLM2 (layers 3–8,
measured on ``fixed_text.txt``), so every edit leaks into ordinary text and perplexity drifts.
Sampling the model from a handful of generic openings and reading its MLP keys on its own
output needs nothing outside the weights either, and the dominant directions of those keys
cover prose as well as AlphaEdit's shipped-prose statistics do (17–19% editable against 13–39%).

Sampling is seeded, EOS is held off so every row has the same length, and the result is cached
on disk by ``workers.editing.stats``; generation runs once per model (~35 s for 4k tokens on
two CPU cores).
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
TOP_K = 50
MAX_ROW = 256
_VERSION = "1"  # bump when the sampling changes, so cached statistics are rebuilt


def self_text_id(seed: int = 0) -> str:
    """Identifies the sampling settings; stored with cached statistics."""
    spec = "|".join((_VERSION, str(seed), str(TOP_K), *OPENINGS))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _openings(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [list(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in OPENINGS]


def _layout(max_tokens: int) -> tuple[int, int]:
    """(rows per opening, sampled tokens per row). A row is at most ``MAX_ROW`` tokens: sampling
    cost grows with a row's length, so more text means more rows (16k tokens took ~14 min as 16
    rows of 1,024 on two CPU cores). Up to 4k tokens this is one row per opening, as before."""
    rows = max(1, -(-max_tokens // (MAX_ROW * len(OPENINGS))))
    return rows, max(1, max_tokens // (rows * len(OPENINGS)))


def self_text_length(tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> int:
    """Tokens ``self_text_chunks`` returns: the openings plus the sampled continuations."""
    rows, per_row = _layout(max_tokens)
    return rows * (sum(len(e) for e in _openings(tokenizer)) + per_row * len(OPENINGS))


@torch.no_grad()
def self_text_chunks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    seed: int = 0,
) -> list[list[int]]:
    """Chunks of an opening and its sampled continuation: each opening once per row
    (``_layout``), ``max_tokens`` sampled tokens in all."""
    rows, per_row = _layout(max_tokens)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = _openings(tokenizer) * rows
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
    return [e + out[row, width:].tolist() for row, e in enumerate(encoded)]
