"""Choosing the editor the worker runs: a method of the editing core, or any Editor class."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.editor import Editor


def make_editor(
    spec: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    options: Mapping[str, str] | None = None,
) -> Editor:
    """``spec`` is a method name for ``build_editor`` ("loki", ...) or ``module.path:Class``;
    ``options`` set fields of the method's config (``LOKID_EDITOR_OPTIONS``)."""
    if ":" in spec:
        check_options(spec, options or {})
        module_name, _, class_name = spec.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Editor)):
            raise ValueError(f"editor: {spec!r} is not an Editor subclass")
        return cls(model, tokenizer)
    return _factory(spec).build_editor(spec, model, tokenizer, options)


def check_options(spec: str, options: Mapping[str, str]) -> None:
    """Refuse options ``spec`` cannot take: any at all for an Editor class; for a method, unknown
    names and values of the wrong kind (ranges that depend on the model are checked when the
    editor is built)."""
    if not options:
        return
    if ":" in spec:
        raise ValueError("only the editing core's methods (loki, ...) take options")
    _factory(spec).config_for(spec, options)


def _factory(spec: str) -> ModuleType:
    try:
        return importlib.import_module("workers.editing.factory")
    except ModuleNotFoundError as error:
        if error.name != "workers.editing.factory":
            raise
        raise ValueError(
            f"editor: method {spec!r} needs workers.editing.factory, which is not installed"
        ) from None
