"""/admin: the dashboard's pages and the htmx fragments that keep them live.

Thin: each handler reads through the same services as /v1/admin/* and renders a template.
Every page needs an admin session (else the login page); every POST a CSRF token.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.admin import overview_of
from app.api.admin_auth import Admin, require_admin_page, require_csrf
from app.api.deps import RuntimeDep, SessionDep
from app.api.versions import rollback_now
from app.dashboard import batch_upload
from app.dashboard.login import router as login_router
from app.dashboard.plot import health_svg
from app.dashboard.templating import render
from app.db.models import TERMINAL, EditStatus
from app.schemas.admin import PLAYGROUND_MAX_TOKENS, PlaygroundCreate
from app.schemas.edits import EditCreate
from app.schemas.ids import MAX_ID
from app.services import edits as edit_service
from app.services.admin import edit_log, playground, version_diff, version_tree
from app.services.edits import InvalidEdit
from app.serving.generation import BadPrompt, GenParams

AdminPage = Annotated[Admin, Depends(require_admin_page)]
Csrf = Depends(require_csrf)
router = APIRouter(prefix="/admin", include_in_schema=False)
router.include_router(login_router)
PAGE_SIZE = 25
EditId = Annotated[int, Path(ge=1, le=MAX_ID)]
VersionId = Annotated[int, Path(ge=0, le=MAX_ID)]


def problems(error: ValidationError | InvalidEdit) -> str:
    """A form's validation errors as one line that names each field."""
    if isinstance(error, InvalidEdit):
        return f"{error.loc[-1]}: {error.message}"
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in error.errors()
    )


# -- overview -----------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def overview_page(request: Request, admin: AdminPage, runtime: RuntimeDep) -> Response:
    return render(request, "overview.html", page="/admin", o=overview_of(runtime))


@router.get("/fragments/overview", response_class=HTMLResponse)
def overview_fragment(request: Request, admin: AdminPage, runtime: RuntimeDep) -> Response:
    return render(request, "_overview.html", o=overview_of(runtime))


# -- edits --------------------------------------------------------------------------------


def edit_page_context(
    session: SessionDep,
    status: Annotated[EditStatus | None, Query()] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> dict[str, Any]:
    """One page of the edit log and the links around it, from the page's query string."""
    q = q or None
    page, next_before = edit_log.search(
        session, status=status, query=q, limit=PAGE_SIZE, before=before
    )
    filters = {k: v for k, v in (("status", status.value if status else None), ("q", q)) if v}
    return {
        "edits": [edit_service.public(e) for e in page],
        "status": status.value if status else None,
        "q": q,
        "before": before,
        "next_before": next_before,
        "query": urlencode({**filters, **({"before": before} if before else {})}),
        "first_query": urlencode(filters),
        "older_query": urlencode({**filters, "before": next_before}),
    }


EditPage = Annotated[dict[str, Any], Depends(edit_page_context)]


@router.get("/edits", response_class=HTMLResponse)
def edits_page(
    request: Request, admin: AdminPage, runtime: RuntimeDep, context: EditPage
) -> Response:
    return render(
        request,
        "edits.html",
        page="/admin/edits",
        statuses=[s.value for s in EditStatus],
        max_batch=runtime.settings.max_batch,
        **context,
    )


@router.get("/fragments/edits", response_class=HTMLResponse)
def edit_rows(request: Request, admin: AdminPage, context: EditPage) -> Response:
    return render(request, "_edit_rows.html", **context)


def _submitted(request: Request, edits: list[Any], error: str | None = None) -> Response:
    return render(
        request,
        "_submitted.html",
        status_code=422 if error else 202,
        edits=[edit_service.public(e) for e in edits],
        error=error,
    )


def _submit(
    request: Request, runtime: RuntimeDep, items: list[EditCreate], batch: bool
) -> Response:
    try:
        tokenizer = runtime.generator.tokenizer
        edit_service.check(items, batch=batch, limits=runtime.limits, tokenizer=tokenizer)
    except InvalidEdit as error:
        return _submitted(request, [], problems(error))
    edits, _ = edit_service.submit(
        runtime.infra.factory, runtime.infra.dispatcher, items, batch=batch
    )
    return _submitted(request, edits)


@router.post("/edits", response_class=HTMLResponse, dependencies=[Csrf])
def submit_edit(
    request: Request,
    admin: AdminPage,
    runtime: RuntimeDep,
    prompt: Annotated[str, Form()] = "",
    subject: Annotated[str, Form()] = "",
    target_new: Annotated[str, Form()] = "",
    ground_truth: Annotated[str, Form()] = "",
    note: Annotated[str, Form()] = "",
) -> Response:
    fields = {"prompt": prompt, "subject": subject, "target_new": target_new}
    optional = {"ground_truth": ground_truth, "note": note}
    try:
        item = EditCreate(**fields, **{k: v for k, v in optional.items() if v.strip()})
    except ValidationError as error:
        return _submitted(request, [], problems(error))
    return _submit(request, runtime, [item], batch=False)


@router.post("/edits/batch", response_class=HTMLResponse, dependencies=[Csrf])
async def submit_batch(
    request: Request, admin: AdminPage, runtime: RuntimeDep, file: Annotated[UploadFile, File()]
) -> Response:
    try:
        items = batch_upload.parse(await file.read(batch_upload.MAX_BYTES + 1))
    except batch_upload.BadUpload as error:
        return _submitted(request, [], str(error))
    except ValidationError as error:
        return _submitted(request, [], problems(error))
    return await run_in_threadpool(_submit, request, runtime, items, True)


@router.get("/edits/{edit_id}", response_class=HTMLResponse)
def edit_page(request: Request, admin: AdminPage, session: SessionDep, edit_id: EditId) -> Response:
    return render(request, "edit.html", page="/admin/edits", d=edit_log.detail(session, edit_id))


@router.get("/fragments/edits/{edit_id}", response_class=HTMLResponse)
def edit_fragment(
    request: Request, admin: AdminPage, session: SessionDep, edit_id: EditId
) -> Response:
    return render(request, "_edit_detail.html", d=edit_log.detail(session, edit_id))


@router.get("/fragments/edits/{edit_id}/status", response_class=HTMLResponse)
def edit_status(
    request: Request, admin: AdminPage, session: SessionDep, edit_id: EditId
) -> Response:
    edit = edit_service.public(edit_service.get(session, edit_id))
    return render(request, "_status.html", e=edit, terminal=edit["status"] in TERMINAL)


# -- versions -----------------------------------------------------------------------------


@router.get("/versions", response_class=HTMLResponse)
def versions_page(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    rolled: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
) -> Response:
    tree = version_tree.tree(session)
    head_node = next((n for n in tree["versions"] if n["is_head"]), None)
    flash = (
        f"Rolled back: v{rolled} is the head and is being served." if rolled is not None else None
    )
    return render(
        request,
        "versions.html",
        page="/admin/versions",
        t=tree,
        roots=version_tree.nested(tree["versions"]),
        default_a=head_node["parent"] if head_node and head_node["parent"] is not None else 0,
        flash=flash,
    )


def _diff(runtime: RuntimeDep, session: SessionDep, a: int, b: int) -> dict[str, Any]:
    serving = runtime.serving
    return version_diff.diff(session, serving.catalog, serving.live.materialiser, a, b)


@router.get("/fragments/diff", response_class=HTMLResponse)
def diff_fragment(
    request: Request,
    admin: AdminPage,
    runtime: RuntimeDep,
    session: SessionDep,
    a: Annotated[int, Query(ge=0, le=MAX_ID)],
    b: Annotated[int, Query(ge=0, le=MAX_ID)],
) -> Response:
    return render(request, "_diff.html", d=_diff(runtime, session, a, b))


@router.get("/versions/{version}/rollback", response_class=HTMLResponse)
def rollback_confirm(
    request: Request, admin: AdminPage, runtime: RuntimeDep, session: SessionDep, version: VersionId
) -> Response:
    """The confirmation step: what a rollback to ``version`` would revert."""
    tree = version_tree.tree(session)
    head = tree["head"]
    return render(
        request,
        "rollback.html",
        page="/admin/versions",
        target=version,
        head=head,
        d=_diff(runtime, session, head, version),
    )


@router.post("/versions/{version}/rollback", dependencies=[Csrf])
async def rollback(
    request: Request, admin: AdminPage, runtime: RuntimeDep, version: VersionId
) -> Response:
    try:
        await run_in_threadpool(rollback_now, runtime, version)
    except (edit_service.Conflict, edit_service.NotFound) as error:  # e.g. an unreadable version
        return render(request, "refused.html", status_code=409, page="/admin/versions", error=error)
    return RedirectResponse(f"/admin/versions?rolled={version}", status_code=303)


# -- playground and health ----------------------------------------------------------------


@router.get("/playground", response_class=HTMLResponse)
def playground_page(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    prompt: Annotated[str | None, Query(max_length=4000)] = None,
    version: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
) -> Response:
    tree = version_tree.tree(session)
    versions = sorted((n["id"] for n in tree["versions"]), reverse=True)
    return render(
        request,
        "playground.html",
        page="/admin/playground",
        head=tree["head"],
        versions=versions,
        version=version if version is not None else (tree["head"] - 1 if tree["head"] else 0),
        prompt=prompt,
        max_tokens=PLAYGROUND_MAX_TOKENS,
    )


@router.post("/playground", response_class=HTMLResponse, dependencies=[Csrf])
async def playground_answers(
    request: Request,
    admin: AdminPage,
    runtime: RuntimeDep,
    prompt: Annotated[str, Form()] = "",
    version: Annotated[str, Form()] = "",
    max_new_tokens: Annotated[str, Form()] = "16",
) -> Response:
    try:
        body = PlaygroundCreate(prompt=prompt, version=version, max_new_tokens=max_new_tokens)
        result = await run_in_threadpool(
            playground.compare,
            runtime.infra.factory,
            runtime.generator,
            body.prompt,
            body.version,
            GenParams(max_new_tokens=body.max_new_tokens),
        )
    except ValidationError as error:
        return render(request, "_answers.html", status_code=422, error=problems(error))
    except (BadPrompt, edit_service.NotFound) as error:
        return render(request, "_answers.html", status_code=422, error=str(error))
    return render(request, "_answers.html", r=result)


def _plot(session: SessionDep) -> Any:
    return health_svg(version_tree.health_series(session)["points"])


@router.get("/health", response_class=HTMLResponse)
def health_page(request: Request, admin: AdminPage, session: SessionDep) -> Response:
    return render(request, "health.html", page="/admin/health", plot=_plot(session))


@router.get("/fragments/health", response_class=HTMLResponse)
def health_fragment(admin: AdminPage, session: SessionDep) -> Response:
    return HTMLResponse(str(_plot(session)))
