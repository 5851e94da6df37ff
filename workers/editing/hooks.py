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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

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


# model -> {layer: whether running the blocks above it alone reproduces the full forward}. Per
# layer: models that give each block an attention mask or rotary table by its position in the
# list (Gemma 3, Qwen 2/3, … via config.layer_types) are exact at some layers and not at others.
# Weak keys: a freed model's entry goes with it.
_upper_ok: weakref.WeakKeyDictionary[nn.Module, dict[int, bool]] = weakref.WeakKeyDictionary()


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
    a quarter of SmolLM2's forward saved at layers 6–8). Used only where one comparison with
    the full forward (per model and layer) shows the shortcut is exact and the model does not
    assign block types by position; otherwise every call runs the whole model with ``shift``
    added by a hook.
    """

    def __init__(self, model: PreTrainedModel, batch: PromptBatch, layer: int) -> None:
        self.model, self.batch, self.layer = model, batch, layer
        # (rows, seq, d_model): the residual stream after ``layer``
        self.hidden = hidden_of(forward_until(model, batch, block(model, layer))).detach()

    def _upper(self, shift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "inputs_embeds": self.hidden + shift,
            "attention_mask": self.batch.attention_mask,
            "use_cache": False,
        }
        with only_blocks_from(self.model, self.layer + 1):
            if _supports_logits_to_keep(type(self.model)):
                return self.model(**kwargs, logits_to_keep=positions).logits
            return self.model(**kwargs).logits[:, positions]

    def _full(self, shift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with output_hooks({block(self.model, self.layer): lambda _x, h: h + shift}):
            return logits_at(self.model, self.batch, positions)

    def logits(self, shift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at ``positions`` with ``shift`` (rows, seq, d_model) added after the block."""
        known = _upper_ok.setdefault(self.model, {})
        if self.layer not in known:
            if _layer_types_shift(self.model, self.layer + 1):
                known[self.layer] = False
            else:
                with torch.no_grad():
                    zero = torch.zeros_like(self.hidden)
                    full, upper = self._full(zero, positions), self._upper(zero, positions)
                scale = full.abs().max().clamp_min(1e-6)
                known[self.layer] = bool((full - upper).abs().max() <= 1e-3 * scale)
        if known[self.layer]:
            return self._upper(shift, positions)
        return self._full(shift, positions)
