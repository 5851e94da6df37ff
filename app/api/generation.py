"""/v1/generate: lokid's own generation endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.auth import require_scope
from app.api.deps import RuntimeDep
from app.api.streaming import chunks, sse, sse_response
from app.schemas.generation import GenerateCreate, GeneratePublic
from app.services.limits import Limits
from app.serving.generation import Chunk, GenParams

router = APIRouter(tags=["generation"], dependencies=[Depends(require_scope("generate"))])


def params_of(body: GenerateCreate, limits: Limits) -> GenParams:
    explicit = "max_new_tokens" in body.model_fields_set
    return GenParams(
        max_new_tokens=limits.new_tokens(body.max_new_tokens, explicit=explicit),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
    )


@router.post("/v1/generate", response_model=GeneratePublic)
async def generate(body: GenerateCreate, runtime: RuntimeDep) -> object:
    """``stream: true`` sends ``token`` events, then one ``done`` event with the whole answer."""
    generator, params = runtime.generator, params_of(body, runtime.limits)
    if not body.stream:
        out = await run_in_threadpool(generator.complete, body.prompt, params)
        return {
            "text": out.text,
            "version": out.version,
            "finish_reason": out.finish_reason,
            "usage": out.usage,
        }

    def render(chunk: Chunk) -> list[str]:
        lines = [sse({"text": chunk.text, "version": chunk.version}, "token")] if chunk.text else []
        if chunk.final is not None:
            out = chunk.final
            done = {
                "text": out.text,
                "version": out.version,
                "finish_reason": out.finish_reason,
                "usage": out.usage,
            }
            lines.append(sse(done, "done"))
        return lines

    generator.encode(body.prompt, params.max_new_tokens)  # refuse a bad prompt before streaming
    response: StreamingResponse = sse_response(
        chunks(generator, body.prompt, params, "generate"), render
    )
    return response
