"""Building an editor by method name, for the benchmark and the worker."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.editor import Editor

METHODS: tuple[str, ...] = ("loki", "ft", "memit", "alphaedit")


def _editor_and_config(method: str) -> tuple[type[Editor], type[Any]]:
    # imports stay inside: each method pulls in its own machinery, and a missing or broken
    # method must not stop the others from being built
    if method == "loki":
        from workers.editing.loki import LokiConfig, LokiEditor

        return LokiEditor, LokiConfig
    if method == "ft":
        from workers.editing.baselines import FTConfig, FTEditor

        return FTEditor, FTConfig
    if method == "memit":
        from workers.editing.baselines import MemitConfig, MemitEditor

        return MemitEditor, MemitConfig
    if method == "alphaedit":
        from workers.editing.baselines import AlphaEditConfig, AlphaEditEditor

        return AlphaEditEditor, AlphaEditConfig
    raise ValueError(f"method: must be one of {METHODS}, got {method!r}")


def with_overrides(config: Any, overrides: Mapping[str, str], prefix: str = "") -> Any:
    """A copy of a config dataclass with ``{"field": "value", "nested.field": "value"}`` set.

    Values are Python literals (``3``, ``0.5``, ``(4, 5)``, ``None``); the dataclass's own
    checks then refuse what is out of range."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    fields = {f.name for f in dataclasses.fields(config)}
    for key, raw in overrides.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            raise ValueError(f"{prefix}{head}: no such setting; known: {', '.join(sorted(fields))}")
        if rest:
            nested.setdefault(head, {})[rest] = raw
            continue
        try:
            changes[head] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ValueError(f"{prefix}{head}: {raw!r} is not a Python literal") from None
    for head, sub in nested.items():
        inner = getattr(config, head)
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"{prefix}{head}: has no fields to set")
        changes[head] = with_overrides(inner, sub, prefix=f"{prefix}{head}.")
    return dataclasses.replace(config, **changes)


def build_editor(
    method: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    overrides: Mapping[str, str] | None = None,
) -> Editor:
    editor_class, config_class = _editor_and_config(method)
    config = with_overrides(config_class(), overrides or {})
    return editor_class(model, tokenizer, config)  # type: ignore[call-arg]
