"""Forward hooks the editors share: trying weight changes without writing them, reading
activations, and stopping a forward pass early.

``Editor.compute`` must leave the weights untouched, yet MEMIT and AlphaEdit need the model *with*
the earlier layers' updates to find the next layer's keys, and every method checks success on the
edited model. A hook that adds ``(k bᵀ) aᵀ`` to a layer's output gives the same result as
``W + a b``, costs a rank-r product instead of a full copy, and is undone exactly by removing it,
even when the computation in between raises.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from workers.editing.arch import block, down_proj, only_blocks_from
from workers.editing.batch import PromptBatch
from workers.editing.delta import MatrixDelta

# (module input or None when passed by keyword, module output) -> new output
OutputFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised from a hook once everything needed has been read, to skip the remaining layers."""


def hidden_of(output: Any) -> torch.Tensor:
    """A block's hidden states whether it returns a tensor or a tuple (older transformers)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def output_hooks(hooks: Mapping[nn.Module, OutputFn]) -> Iterator[None]:
    """While open, each module's output is replaced by ``fn(input, output)``."""

    def wrap(fn: OutputFn) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            return _replace_hidden(output, fn(args[0] if args else None, hidden_of(output)))

        return hook

    handles = [module.register_forward_hook(wrap(fn)) for module, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def frozen(model: PreTrainedModel) -> Iterator[None]:
    """Weights need no gradient while an editor optimises its own tensors: backward then skips
    every weight gradient, which halves each step (measured on SmolLM2, 7 prompts: 1.87 s →
    0.93 s per step on one thread)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _delta_fn(delta: MatrixDelta) -> OutputFn:
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def fn(x: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        assert x is not None, "down_proj is called with its input as a positional argument"
        key = (x.device, x.dtype)
        if key not in cache:
            parts = (delta.a, delta.b) if delta.dense is None else (delta.dense,)
            cache[key] = tuple(p.to(device=x.device, dtype=x.dtype) for p in parts if p is not None)
        parts = cache[key]
        change = x @ parts[0].T if len(parts) == 1 else (x @ parts[1].T) @ parts[0].T
        return out + change

    return fn


@contextmanager
def applied(model: PreTrainedModel, deltas: Mapping[int, MatrixDelta]) -> Iterator[None]:
    """The model behaves as if each layer's down_proj had its delta added; weights untouched."""
    with output_hooks({down_proj(model, layer): _delta_fn(d) for layer, d in deltas.items()}):
        yield


@contextmanager
def read_inputs(modules: Mapping[int, nn.Module], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Records each module's input (detached) under its key."""

    def make(key: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            store[key] = args[0].detach()

        return hook

    handles = [m.register_forward_hook(make(k)) for k, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: PreTrainedModel, batch: PromptBatch, last: nn.Module) -> Any:
    """Run ``batch`` only as far as ``last`` and return its output: the keys editors need sit
    in early layers."""
    seen: list[Any] = []

    def stop(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        seen.append(output)
        raise StopForward

    handle = last.register_forward_hook(stop)
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


@functools.cache
def _supports_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def logits_at(model: PreTrainedModel, batch: PromptBatch, positions: torch.Tensor) -> torch.Tensor:
    """Logits (rows, len(positions), vocab) at the given sequence positions of every row.

    Only a handful of positions matter to an editor; projecting just those onto the vocabulary
    saves the lm_head's cost (a fifth of SmolLM2's forward pass) on every optimisation step.
    """
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if _supports_logits_to_keep(type(model)):
        return model(**kwargs, use_cache=False, logits_to_keep=positions).logits
    return model(**kwargs, use_cache=False).logits[:, positions]


# model -> {(layer, prefix cached): whether running the blocks above it alone reproduces the full
# forward}. Per layer: models that give each block an attention mask or rotary table by its
# position in the list (Gemma 3, Qwen 2/3, … via config.layer_types) are exact at some layers and
# not at others.
# Weak keys: a freed model's entry goes with it.
_upper_ok: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, bool], bool]] = (
    weakref.WeakKeyDictionary()
)


def _plain_cache(model: PreTrainedModel) -> bool:
    """Whether a hand-built additive 4D mask over a full key cache is what every layer sees:
    eager or SDPA attention, no sliding-window or chunked layers (their caches drop keys and
    their masks are not the plain causal one)."""
    if getattr(model.config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return False
    return not any(DynamicCache(config=model.config).is_sliding)


def _layer_types_shift(model: PreTrainedModel, first: int) -> bool:
    """Whether slicing the block list at ``first`` hands blocks another layer's type."""
    types = getattr(model.config, "layer_types", None)
    if not types:
        return False
    types = list(types)
    return types[first:] != types[: len(types) - first]


class UpperForward:
    """Logits of ``batch`` when only what follows block ``layer`` can change.

    v*'s optimisation adds δ to the output of one block and asks for logits at every step;
    the blocks below it give the same output every time. This runs them once, keeps the
    residual stream after ``layer``, and on each call runs only the blocks above it (a fifth to
    a quarter of SmolLM2's forward saved at layers 6–8).

    With ``starts`` (per row: the first column the shift touches and whose logits are asked
    for; v*'s subject token), the columns before it cannot change either: their keys and
    values in the blocks above are computed once and cached, and each call runs only each
    row's tail, packed from column 0 with its true positions. On CounterFact prompts with
    MEMIT's context prefixes that is about a third of the columns.

    Either shortcut is used only where one comparison with the full forward (per model and
    layer) shows it exact and the model does not assign block types by position; otherwise
    every call runs the whole model with ``shift`` added by a hook.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        batch: PromptBatch,
        layer: int,
        starts: Sequence[int] | None = None,
    ) -> None:
        self.model, self.batch, self.layer = model, batch, layer
        # (rows, seq, d_model): the residual stream after ``layer``
        self.hidden = hidden_of(forward_until(model, batch, block(model, layer))).detach()
        device = self.hidden.device
        self.lengths = batch.attention_mask.sum(dim=1)
        self.starts = torch.zeros_like(self.lengths)
        if starts is not None:
            self.starts = torch.tensor(list(starts), device=device).clamp_min(0)
            if len(self.starts) != len(self.lengths) or bool((self.starts >= self.lengths).any()):
                raise ValueError("starts: one column per row, inside the row")
        # decided once: _plain_cache builds a cache object, and this is read on every step
        self.cached = bool(self.starts.max() > 0) and _plain_cache(model)
        self._prefix: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def _run(self, positions: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with only_blocks_from(self.model, self.layer + 1):
            if _supports_logits_to_keep(type(self.model)):
                return self.model(**kwargs, logits_to_keep=positions).logits
            return self.model(**kwargs).logits[:, positions]

    def _prefix_cache(self) -> DynamicCache:
        """Keys and values of every row's columns before its start, in the blocks above."""
        if self._prefix is None:
            width = int(self.starts.max())
            last = torch.tensor([width - 1], device=self.hidden.device)
            with torch.no_grad():
                self._run(
                    last,
                    inputs_embeds=self.hidden[:, :width],
                    attention_mask=self.batch.attention_mask[:, :width],
                    position_ids=torch.arange(width, device=self.hidden.device)[None],
                    past_key_values=(cache := DynamicCache(config=self.model.config)),
                    use_cache=True,
                )
            self._prefix = [
                (lay.keys, lay.values) if i > self.layer and lay.is_initialized else None
                for i, lay in enumerate(cache.layers)
            ]
        data = [(None, None) if kv is None else kv for kv in self._prefix]
        return DynamicCache(data, config=self.model.config)

    def _tails(self, shift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each row's columns from its start on, run against the cached prefix."""
        hidden = self.hidden + shift
        device = hidden.device
        width = int(self.starts.max())
        n_tail = self.lengths - self.starts  # real tokens in each row's tail
        span = int(n_tail.max())
        j = torch.arange(span, device=device)
        cols = (self.starts[:, None] + j).clamp_max(hidden.shape[1] - 1)  # (rows, span)
        embeds = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))
        # attend to the row's own prefix (before its start) and causally within the real tail
        prefix_ok = torch.arange(width, device=device)[None, :] < self.starts[:, None]
        tail_ok = (j[None, :] <= j[:, None])[None] & (j < n_tail[:, None])[:, None, :]
        allowed = torch.cat([prefix_ok[:, None, :].expand(-1, span, -1), tail_ok], dim=2)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
        # logits wanted at tail index (position − start); one shared set of indices for all rows
        wanted = positions[None, :] - self.starts[:, None]  # (rows, n_pos)
        inside = (wanted >= 0) & (wanted < span)
        keep = torch.unique(wanted[inside]) if bool(inside.any()) else j[:1]
        logits = self._run(
            keep,
            inputs_embeds=embeds,
            attention_mask=mask[:, None],
            position_ids=cols,
            past_key_values=self._prefix_cache(),
            use_cache=True,
        )
        at = torch.searchsorted(keep, wanted.clamp(0, span - 1)).clamp_max(len(keep) - 1)
        return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))

    def _upper(self, shift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.cached:
            return self._tails(shift, positions)
        return self._run(
            positions,
            inputs_embeds=self.hidden + shift,
            attention_mask=self.batch.attention_mask,
            use_cache=False,
        )

    def _full(self, shift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with output_hooks({block(self.model, self.layer): lambda _x, h: h + shift}):
            return logits_at(self.model, self.batch, positions)

    def _answered(self, positions: torch.Tensor) -> torch.Tensor:
        """(rows, n_pos): which logits the shortcut computes (the rest are filler)."""
        return (positions[None, :] >= self.starts[:, None]) & (
            positions[None, :] < self.lengths[:, None]
        )

    @torch.no_grad()
    def _agrees(self, positions: torch.Tensor, answered: torch.Tensor) -> bool:
        zero = torch.zeros_like(self.hidden)
        try:
            upper = self._upper(zero, positions)[answered]
        except Exception:  # an architecture the shortcut does not fit: use the full forward
            return False
        full = self._full(zero, positions)[answered]
        scale = full.abs().max().clamp_min(1e-6)
        return bool((full - upper).abs().max() <= 1e-3 * scale)

    def logits(self, shift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at ``positions`` with ``shift`` (rows, seq, d_model) added after the block.

        With ``starts``, a row's logits before its start are filler, and its shift there is
        ignored."""
        known = _upper_ok.setdefault(self.model, {})
        key = (self.layer, self.cached)
        if key not in known:
            if _layer_types_shift(self.model, self.layer + 1):
                known[key] = False
            else:
                answered = self._answered(positions)
                if not bool(answered.any()):  # nothing to compare: decide on a later batch
                    return self._full(shift, positions)
                known[key] = self._agrees(positions, answered)
        if known[key]:
            return self._upper(shift, positions)
        return self._full(shift, positions)
