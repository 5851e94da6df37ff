"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from app.api.deps import RuntimeDep
from app.db.models import Edit, Version, utcnow
from app.db.session import ping
from app.services.admin.overview import worker_state
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


def _gauge(lines: list[str], name: str, help_text: str, values: dict[str, float | None]) -> None:
    """One gauge in the text format; ``values`` maps a label string ('' for none) to a value."""
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in values.items():
        if value is not None:
            lines.append(f"{name}{labels} {value}")


@router.get("/metrics")
def metrics(runtime: RuntimeDep) -> Response:
    # Edit counts, the queue, the head and its health come from the database, so they agree
    # across replicas; latencies and tokens/s are this process's own.
    with runtime.infra.factory() as session:
        head = get_head(session)
        counts = session.execute(select(Edit.status, func.count()).group_by(Edit.status)).all()
        health = session.scalar(select(Version.health).where(Version.id == head)) or {}
        worker = worker_state(session, utcnow())
    by_status = {str(status): int(count) for status, count in counts}
    lines: list[str] = []
    _gauge(
        lines,
        "lokid_edits",
        "Edits in the log by status",
        {f'{{status="{s}"}}': n for s, n in by_status.items()},
    )
    _gauge(
        lines,
        "lokid_queue_depth",
        "Edits queued, not yet started",
        {"": by_status.get("queued", 0)},
    )
    _gauge(lines, "lokid_head_version", "The head version in the database", {"": head})
    _gauge(
        lines,
        "lokid_model_canary_accuracy",
        "Share of canary facts the head version answers",
        {"": health.get("canary_accuracy")},
    )
    _gauge(
        lines,
        "lokid_model_perplexity",
        "Perplexity of the head version on the fixed text",
        {"": health.get("perplexity")},
    )
    _gauge(
        lines,
        "lokid_worker_heartbeat_age_seconds",
        "Seconds since the edit worker last wrote its heartbeat",
        {"": worker["age_seconds"]},
    )
    body = generate_latest() + ("\n".join(lines) + "\n").encode()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
