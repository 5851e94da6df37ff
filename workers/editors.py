"""Choosing the editor the worker runs: a method of the editing core, or any Editor class."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

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
        if options:
            raise ValueError("editor_options: only the editing core's methods take options")
        module_name, _, class_name = spec.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Editor)):
            raise ValueError(f"editor: {spec!r} is not an Editor subclass")
        return cls(model, tokenizer)
    try:
        factory = importlib.import_module("workers.editing.factory")
    except ModuleNotFoundError as error:
        if error.name != "workers.editing.factory":
            raise
        raise ValueError(
            f"editor: method {spec!r} needs workers.editing.factory, which is not installed"
        ) from None
    return factory.build_editor(spec, model, tokenizer, options)
