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


def _literal(name: str, raw: str, current: Any) -> Any:
    """``raw`` parsed as a Python literal of the same kind as the setting's current value; a text
    setting also takes its value bare (``style=articles`` as well as ``style='articles'``); bare
    text that reads as a literal (``3``, ``None``) is still taken as that literal."""
    try:
        value = ast.literal_eval(raw)
    except Exception:  # literal_eval raises ValueError, SyntaxError, TypeError, MemoryError…
        if isinstance(current, str):
            return raw
        raise ValueError(f"{name}: {raw!r} is not a Python literal") from None
    if current is None or value is None:
        return value  # an optional setting: the config's own checks decide
    if isinstance(current, tuple) and isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(current):
        raise ValueError(
            f"{name}: expected a {type(current).__name__} like {current!r}, got {raw!r}"
        )
    return value


def with_overrides(config: Any, overrides: Mapping[str, str], prefix: str = "") -> Any:
    """A copy of a config dataclass with ``{"field": "value", "nested.field": "value"}`` set.

    Values are Python literals of the setting's kind (``3``, ``0.5``, ``(4, 5)``, ``None``, or
    bare text for a text setting);
    the dataclass's own checks then refuse what is out of range."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    fields = {f.name for f in dataclasses.fields(config)}
    for key, raw in overrides.items():
        head, dot, rest = key.partition(".")
        if head not in fields:
            raise ValueError(f"{prefix}{head}: no such setting; known: {', '.join(sorted(fields))}")
        if dot and not rest:
            raise ValueError(f"{prefix}{key}: missing the setting after the dot")
        if rest:
            nested.setdefault(head, {})[rest] = raw
        else:
            changes[head] = _literal(prefix + head, raw, getattr(config, head))
    for head, sub in nested.items():
        inner = getattr(config, head)
        if head in changes or not dataclasses.is_dataclass(inner):
            raise ValueError(f"{prefix}{head}: set as a whole and by field, or has no fields")
        changes[head] = with_overrides(inner, sub, prefix=f"{prefix}{head}.")
    return dataclasses.replace(config, **changes)


def config_for(method: str, overrides: Mapping[str, str] | None = None) -> Any:
    """The method's default config with ``overrides`` set; refuses unknown names and values of
    the wrong kind (ranges that depend on the model are checked when the editor is built)."""
    _, config_class = _editor_and_config(method)
    return with_overrides(config_class(), overrides or {})


def build_editor(
    method: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    overrides: Mapping[str, str] | None = None,
) -> Editor:
    editor_class, _ = _editor_and_config(method)
    return editor_class(model, tokenizer, config_for(method, overrides))  # type: ignore[call-arg]
