"""Building an editor by method name, for the benchmark and the worker."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.editor import Editor

METHODS: tuple[str, ...] = ("loki", "ft", "memit", "alphaedit")


def build_editor(method: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Editor:
    # imports stay inside: each method pulls in its own machinery, and a missing or broken
    # method must not stop the others from being built
    if method == "loki":
        from workers.editing.loki import LokiEditor

        return LokiEditor(model, tokenizer)
    if method == "ft":
        from workers.editing.baselines import FTEditor

        return FTEditor(model, tokenizer)
    if method == "memit":
        from workers.editing.baselines import MemitEditor

        return MemitEditor(model, tokenizer)
    if method == "alphaedit":
        from workers.editing.baselines import AlphaEditEditor

        return AlphaEditEditor(model, tokenizer)
    raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
