"""Text generation on the serving model: whole responses and token streams.

A generation calls ``model.generate`` directly with the request's settings, so serving costs no
more per token than the plain library call; the version lock is taken once per request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from app.core import metrics
from app.services.limits import Limits
from app.serving.resident import ServingModel
from app.serving.stats import GenerationStats


@dataclass
class GenParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenOutput:
    text: str
    version: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class Chunk:
    """A piece of streamed text; the last chunk of a stream carries ``final``."""

    text: str
    version: int
    final: GenOutput | None = None


class BadPrompt(ValueError):
    """A prompt the model cannot take (HTTP 422)."""


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.event.is_set()


class _TokenQueue(BaseStreamer):
    """Hands each generated token id to the consuming thread as it is produced."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt itself
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Generator:
    def __init__(self, serving: ServingModel, limits: Limits | None = None) -> None:
        self.serving = serving
        self.limits = limits
        self.tokenizer = serving.loaded.tokenizer
        self.model = serving.loaded.model
        self.stats = GenerationStats()

    def _observe(self, endpoint: str, tokens: int, seconds: float) -> None:
        metrics.GENERATION_SECONDS.labels(endpoint=endpoint).observe(seconds)
        metrics.GENERATED_TOKENS.labels(endpoint=endpoint).inc(tokens)
        if seconds > 0:
            metrics.GENERATION_TOKENS_PER_SECOND.labels(endpoint=endpoint).observe(tokens / seconds)
        self.stats.record(tokens, seconds)

    def encode(self, prompt: str, max_new_tokens: int) -> torch.Tensor:
        # No special tokens: edits are made and scored on the raw prompt text.
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise BadPrompt("prompt: tokenises to nothing")
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and ids.shape[1] + max_new_tokens > context:
            raise BadPrompt(
                f"prompt: {ids.shape[1]} tokens plus {max_new_tokens} new tokens exceed the "
                f"model's context of {context}"
            )
        if self.limits is not None:
            too_many = self.limits.new_tokens_problem(max_new_tokens)
            if too_many:
                raise BadPrompt(f"max_new_tokens: {too_many}")
            too_long = self.limits.prompt_problem(ids.shape[1])
            if too_long:
                raise BadPrompt(f"prompt: {too_long}")
        return ids

    def _kwargs(self, params: GenParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        return kwargs

    def _finish(
        self, new_ids: list[int], prompt_len: int, version: int, params: GenParams
    ) -> GenOutput:
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, params.stop)
        eos = self.tokenizer.eos_token_id
        ended = stopped or bool(new_ids and new_ids[-1] == eos)
        hit_limit = len(new_ids) >= params.max_new_tokens
        return GenOutput(
            text=text,
            version=version,
            prompt_tokens=prompt_len,
            completion_tokens=len(new_ids),
            finish_reason="stop" if ended or not hit_limit else "length",
        )

    @torch.inference_mode()
    def complete(self, prompt: str, params: GenParams, *, endpoint: str = "generate") -> GenOutput:
        ids = self.encode(prompt, params.max_new_tokens).to(self.serving.loaded.device)
        started = time.perf_counter()
        with self.serving.reading() as version:
            return self._complete(ids, params, version, endpoint, started)

    @torch.inference_mode()
    def complete_held(
        self, prompt: str, params: GenParams, version: int, *, endpoint: str
    ) -> GenOutput:
        """``complete`` for a caller that already holds ``version``'s weights."""
        ids = self.encode(prompt, params.max_new_tokens).to(self.serving.loaded.device)
        return self._complete(ids, params, version, endpoint, time.perf_counter())

    def _complete(
        self, ids: torch.Tensor, params: GenParams, version: int, endpoint: str, started: float
    ) -> GenOutput:
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **self._kwargs(params)
        )
        new_ids = out[0, ids.shape[1] :].tolist()
        self._observe(endpoint, len(new_ids), time.perf_counter() - started)
        return self._finish(new_ids, ids.shape[1], version, params)

    def stream(
        self,
        prompt: str,
        params: GenParams,
        *,
        cancel: threading.Event | None = None,
        endpoint: str = "generate",
    ) -> Iterator[Chunk]:
        """Yields text as it is generated; setting ``cancel`` stops the generation."""
        ids = self.encode(prompt, params.max_new_tokens).to(self.serving.loaded.device)
        tokens = _TokenQueue()
        cancel = cancel or threading.Event()
        errors: list[BaseException] = []
        self.serving.lock.acquire_read()
        version = self.serving.version
        assert version is not None

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        streamer=tokens,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                        **self._kwargs(params),
                    )
            except BaseException as error:
                errors.append(error)
                tokens.end()
            finally:
                self.serving.lock.release_read()

        thread = threading.Thread(target=run, name="lokid-generate", daemon=True)
        started = time.perf_counter()
        thread.start()
        new_ids: list[int] = []
        sent = ""
        hold = max((len(s) for s in params.stop), default=1) - 1
        try:
            while (piece := tokens.queue.get()) is not None:
                new_ids.extend(piece)
                text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                text, stopped = _cut_at_stop(text, params.stop)
                # Hold back a possible start of a stop string until it is decided.
                ready = text if stopped else text[: max(len(sent), len(text) - hold)]
                if len(ready) > len(sent):
                    yield Chunk(ready[len(sent) :], version)
                    sent = ready
                if stopped:
                    cancel.set()
                    break
            thread.join()
            if errors:
                raise errors[0]
            final = self._finish(new_ids, ids.shape[1], version, params)
            self._observe(endpoint, len(new_ids), time.perf_counter() - started)
            yield Chunk(final.text[len(sent) :], version, final)
        finally:
            cancel.set()
