"""OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from app.api.auth import require_scope
from app.api.deps import RuntimeDep
from app.api.streaming import chunks, sse, sse_response
from app.api_runtime import ApiRuntime
from app.schemas.openai import ChatCompletionCreate, CompletionCreate
from app.services import openai_compat as oa
from app.services.edits import NotFound
from app.serving.generation import Chunk, GenParams

router = APIRouter(tags=["openai"], dependencies=[Depends(require_scope("generate"))])
ALIAS = "lokid"


def _model(runtime: ApiRuntime, requested: str) -> str:
    name = runtime.serving.name
    if requested not in (name, ALIAS):
        raise NotFound(f"model {requested!r} not found; this server serves {name!r}")
    return name


def _params(body: CompletionCreate | ChatCompletionCreate, limit: int) -> GenParams:
    return GenParams(
        max_new_tokens=limit,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
    )


@router.get("/v1/models")
def models(runtime: RuntimeDep) -> dict[str, object]:
    created = int(runtime.serving.loaded.path.stat().st_mtime)
    return {"object": "list", "data": [oa.model_card(runtime.serving.name, created)]}


@router.post("/v1/completions")
async def completions(body: CompletionCreate, runtime: RuntimeDep) -> object:
    model = _model(runtime, body.model)
    explicit = "max_tokens" in body.model_fields_set
    params = _params(body, runtime.limits.new_tokens(body.max_tokens, explicit=explicit))
    prompt, generator = body.text, runtime.generator
    if not body.stream:
        out = await run_in_threadpool(generator.complete, prompt, params, endpoint="completions")
        return oa.completion(out, model, (prompt if body.echo else "") + out.text)

    cid = oa.new_id("cmpl")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    echoed = [False]

    def render(chunk: Chunk) -> list[str]:
        lines = []
        text = chunk.text
        if body.echo and not echoed[0]:
            text, echoed[0] = prompt + text, True
        finish = chunk.final.finish_reason if chunk.final else None
        if text or finish:
            lines.append(sse(oa.completion_chunk(cid, model, chunk.version, text, finish)))
        if chunk.final is not None:
            if include_usage:
                base = oa.completion_chunk(cid, model, chunk.version, "", None)
                lines.append(sse(oa.usage_chunk(base, chunk.final)))
            lines.append(sse("[DONE]"))
        return lines

    generator.encode(prompt, params.max_new_tokens)
    return sse_response(chunks(generator, prompt, params, "completions"), render)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionCreate, runtime: RuntimeDep) -> object:
    model = _model(runtime, body.model)
    explicit = bool({"max_tokens", "max_completion_tokens"} & body.model_fields_set)
    params = _params(body, runtime.limits.new_tokens(body.limit, explicit=explicit))
    generator = runtime.generator
    prompt = generator.tokenizer.apply_chat_template(
        [m.as_template_input() for m in body.messages], add_generation_prompt=True, tokenize=False
    )
    if not body.stream:
        out = await run_in_threadpool(generator.complete, prompt, params, endpoint="chat")
        return oa.chat_completion(out, model)

    cid = oa.new_id("chatcmpl")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    started = [False]

    def render(chunk: Chunk) -> list[str]:
        lines = []
        if not started[0]:
            started[0] = True
            role = {"role": "assistant", "content": ""}
            lines.append(sse(oa.chat_chunk(cid, model, chunk.version, role, None)))
        if chunk.text:
            delta = {"content": chunk.text}
            lines.append(sse(oa.chat_chunk(cid, model, chunk.version, delta, None)))
        if chunk.final is not None:
            finish = chunk.final.finish_reason
            lines.append(sse(oa.chat_chunk(cid, model, chunk.version, {}, finish)))
            if include_usage:
                base = oa.chat_chunk(cid, model, chunk.version, {}, None)
                lines.append(sse(oa.usage_chunk(base, chunk.final)))
            lines.append(sse("[DONE]"))
        return lines

    generator.encode(prompt, params.max_new_tokens)
    return sse_response(chunks(generator, prompt, params, "chat"), render)
