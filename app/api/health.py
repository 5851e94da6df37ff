"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from app.api.deps import RuntimeDep
from app.db.models import Edit
from app.db.session import ping
from app.services.versions import get_head

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready when the model holds a version and the database and the queue answer."""
    checks: dict[str, str] = {}
    serving = runtime.serving.version
    checks["model"] = "ok" if serving is not None else "no version loaded"
    if runtime.serving.refused:
        checks["model"] = f"serving version {serving}; {runtime.serving.refused}"
    try:
        ping(runtime.infra.engine)
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"{type(error).__name__}: {error}"
    try:
        runtime.infra.dispatcher.ping()
        checks["queue"] = "ok"
    except Exception as error:
        checks["queue"] = f"{type(error).__name__}: {error}"
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "not ready", "version": serving, "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(runtime: RuntimeDep) -> Response:
    # Edit counts and the head come from the database, so they agree across replicas.
    lines = []
    with runtime.infra.factory() as session:
        head = get_head(session)
        counts = session.execute(select(Edit.status, func.count()).group_by(Edit.status)).all()
    lines.append("# HELP lokid_edits Edits in the log by status")
    lines.append("# TYPE lokid_edits gauge")
    for status, count in counts:
        lines.append(f'lokid_edits{{status="{status}"}} {count}')
    lines.append("# HELP lokid_head_version The head version in the database")
    lines.append("# TYPE lokid_head_version gauge")
    lines.append(f"lokid_head_version {head}")
    body = generate_latest() + ("\n".join(lines) + "\n").encode()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
