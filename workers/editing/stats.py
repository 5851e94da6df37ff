"""E[k kᵀ] of MLP keys (down_proj inputs) on ordinary text, per layer, computed once and cached.

MEMIT weighs each update against these statistics (its C = λ·E[k kᵀ]) and AlphaEdit projects
updates onto their null space: K₀ stands for "everything the model already does" that an edit
must not disturb. The papers use 100k Wikipedia samples; nothing may be downloaded here, so:

Text: ``workers/editing/data/k0_text.txt``, plain English prose written for this project
(encyclopedic paragraphs on geography, history, science, people, organisations, sport, the
arts and everyday life, plus a little narrative and dialogue): 70 paragraphs, ~8.2k tokens
for SmolLM2. It is deliberately separate from ``fixed_text.txt``, on which evaluation
measures perplexity: protecting exactly the text a benchmark scores would flatter the
baselines.

Why not text sampled from the model itself: generation costs a full forward pass per token
(~0.27 GFLOP on SmolLM2), over a minute for ~10k tokens on two CPU cores, while reading a fixed
text stops after the deepest requested layer (8 of 30 blocks for layers 3–7).

Every token of every paragraph (split into chunks of at most ``CHUNK_TOKENS``) counts once. The
moment is uncentred, as in MEMIT's ``layer_stats`` ("mom2").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.arch import down_proj
from workers.editing.selftext import (
    resolve_style,
    self_text_chunks,
    self_text_id,
    self_text_length,
)

log = logging.getLogger(__name__)

TEXT_PATH = Path(__file__).parent / "data" / "k0_text.txt"
CHUNK_TOKENS = 128
BATCH_ROWS = 16
DEFAULT_TOKENS = 100_000  # more than the file holds: use all of it

_memo: dict[tuple[str, int, int, str], torch.Tensor] = {}


def default_stats_dir() -> Path:
    return Path(os.environ.get("LOKID_VAR_DIR", "var")) / "stats"


def model_key(model: PreTrainedModel) -> str:
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    return Path(str(name)).name or type(model).__name__


def _text_sha() -> str:
    return hashlib.sha256(TEXT_PATH.read_bytes()).hexdigest()[:16]


def text_chunks(tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[list[int]]:
    """Paragraphs as token chunks, in file order, until ``max_tokens`` tokens are taken."""
    chunks: list[list[int]] = []
    taken = 0
    for paragraph in TEXT_PATH.read_text(encoding="utf-8").split("\n\n"):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        ids = list(tokenizer(paragraph, add_special_tokens=False)["input_ids"])
        for start in range(0, len(ids), CHUNK_TOKENS):
            piece = ids[start : start + CHUNK_TOKENS][: max_tokens - taken]
            if piece:
                chunks.append(piece)
                taken += len(piece)
            if taken >= max_tokens:
                return chunks
    return chunks


def _batch(chunks: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        ids[i, : len(chunk)] = torch.tensor(chunk)
        mask[i, : len(chunk)] = 1
    return ids, mask


class _Stop(Exception):
    """Raised once the deepest wanted layer has run: the later blocks and lm_head are not needed."""


@torch.no_grad()
def _collect(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    chunks: list[list[int]],
) -> tuple[dict[int, torch.Tensor], int]:
    device = next(model.parameters()).device
    if not chunks:
        raise ValueError(f"stats: no text in {TEXT_PATH}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = {layer: torch.zeros((), dtype=torch.float64, device=device) for layer in layers}
    inputs: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook(layer: int) -> Any:
        def record(_module: torch.nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            inputs[layer] = args[0].detach()
            if layer == deepest:
                raise _Stop

        return record

    handles = [down_proj(model, layer).register_forward_hook(hook(layer)) for layer in layers]
    count = 0
    # longest first so each batch pads little
    chunks = sorted(chunks, key=len, reverse=True)
    try:
        for start in range(0, len(chunks), BATCH_ROWS):
            ids, mask = _batch(chunks[start : start + BATCH_ROWS], pad)
            ids, mask = ids.to(device), mask.to(device)
            with contextlib.suppress(_Stop):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.bool()
            for layer in layers:
                # fp32 within a batch (≤ 2k tokens) is exact enough and twice as fast as fp64;
                # the running sum over batches stays fp64
                k = inputs[layer][keep].float()
                sums[layer] = sums[layer] + (k.T @ k).double()
            count += int(keep.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (s / count).float().cpu() for layer, s in sums.items()}, count


SOURCES = ("text", "self")


def key_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    *,
    max_tokens: int = DEFAULT_TOKENS,
    cache_dir: Path | None = None,
    source: str = "text",
    style: str = "openings",
) -> dict[int, torch.Tensor]:
    """layer -> E[k kᵀ] (d_ff × d_ff, fp32, CPU), read from ``var/stats`` when cached there.

    ``source``: "text" reads the shipped prose (the baselines' K₀); "self" samples ``max_tokens``
    tokens from the model itself (``workers.editing.selftext``, LOKI's stand-in for a corpus),
    in ``style`` ("openings" or "articles").
    """
    if source not in SOURCES:
        raise ValueError(f"source: must be one of {SOURCES}, got {source!r}")
    root = cache_dir or default_stats_dir()
    name = model_key(model)
    if source == "text":
        sha, tag = _text_sha(), ""
        n_tokens = sum(len(c) for c in text_chunks(tokenizer, max_tokens))
    else:
        style = resolve_style(tokenizer, style)
        sha, tag = self_text_id(style=style), "-self" if style == "openings" else f"-self-{style}"
        n_tokens = self_text_length(tokenizer, max_tokens, style)
    out: dict[int, torch.Tensor] = {}
    missing: list[int] = []
    for layer in layers:
        memo_key = (name + tag, layer, n_tokens, sha)
        path = root / f"{name}{tag}-layer{layer}-n{n_tokens}.safetensors"
        if memo_key in _memo:
            out[layer] = _memo[memo_key]
        elif (cached := read_cached(path, sha)) is not None:
            out[layer] = _memo[memo_key] = cached
        else:
            missing.append(layer)
    if missing:
        chunks = (
            text_chunks(tokenizer, max_tokens)
            if source == "text"
            else sampled_chunks(
                model, tokenizer, max_tokens, style, root / f"{name}{tag}-n{n_tokens}.json", sha
            )
        )
        moments, count = _collect(model, tokenizer, missing, chunks)
        root.mkdir(parents=True, exist_ok=True)
        for layer, moment in moments.items():
            # filed under the count the lookup computes, so a short generation cannot make
            # every later lookup miss; the true count is kept in the metadata
            path = root / f"{name}{tag}-layer{layer}-n{n_tokens}.safetensors"
            save_atomic(path, moment, {"tokens": str(count), "text_sha256": sha})
            out[layer] = _memo[(name + tag, layer, n_tokens, sha)] = moment
    return out


def sampled_chunks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    style: str,
    path: Path,
    sha: str,
) -> list[list[int]]:
    """The self-sampled text's token chunks, kept at ``path`` once sampled: generating them is
    most of the statistics' cost (~75 s for 8k tokens on two cores), and a layer first asked for
    later (a reserve layer, another candidate set) then needs only a forward pass over them."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("text_sha256") == sha:
                return [list(map(int, chunk)) for chunk in stored["chunks"]]
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            log.warning("%s: unreadable (%s); sampling the text again", path, error)
    chunks = self_text_chunks(model, tokenizer, max_tokens, style=style)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"text_sha256": sha, "chunks": chunks}).encode())
    return chunks


def read_cached(path: Path, sha: str) -> torch.Tensor | None:
    """The statistic stored at ``path`` if it exists and was computed from the text ``sha``."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("text_sha256") != sha:
            return None
    return load_file(path)["mom2"]


def save_atomic(path: Path, moment: torch.Tensor, metadata: dict[str, str]) -> None:
    _replace_atomic(path, lambda tmp: save_file({"mom2": moment.contiguous()}, tmp, metadata))


def write_atomic(path: Path, data: bytes) -> None:
    _replace_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def _replace_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Write beside the target and rename, so a crash never leaves a truncated cache file."""
    fd, tmp = tempfile.mkstemp(prefix=".stats-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is not secret
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
