"""The ``lokid`` command: run the server or the worker, migrate, and talk to a running API."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from app.core.config import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(help="lokid: fact corrections applied to a served model, versioned.")
db_app = typer.Typer(help="Database schema (Alembic migrations).")
app.add_typer(db_app, name="db")
keys_app = typer.Typer(help="API keys, kept in the database (LOKID_DATABASE_URL).")
app.add_typer(keys_app, name="keys")
console = Console()
ApiOption = Annotated[
    str | None, typer.Option("--api", help="API base URL [env LOKID_API_URL]", show_default=False)
]


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        _fail(str(error))


def _logging(settings: Settings) -> None:
    from app.core.logs import configure

    configure(settings.log_format, settings.log_level)


def _bootstrap_admin(settings: Settings, factory: Any) -> None:
    """First start: no admin key yet, so nobody could log in to /admin. Print one, once."""
    from app.services.admin_sessions import ensure_admin_key

    if not settings.bootstrap_admin_key:
        return
    raw = ensure_admin_key(factory)
    if raw is not None:
        console.print(
            "[bold]No admin key existed, so one was created (shown only now):[/bold]\n"
            f"  {raw}\n"
            "Log in to the dashboard at /admin/login with it, or send it as "
            "Authorization: Bearer. Keep it safe; `lokid keys revoke bootstrap-admin` ends it.",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    access_log: Annotated[
        bool, typer.Option(help="Log every request (costs throughput at high rates).")
    ] = False,
    workers: Annotated[
        int, typer.Option(min=1, help="API processes (needs LOKID_REDIS_URL when above 1).")
    ] = 1,
) -> None:
    """Start the API (and, without LOKID_REDIS_URL, the edit worker on a thread)."""
    settings = _settings()
    problem = settings.bind_problem(host)
    if problem:
        _fail(f"--host: {problem}")
    # Imported only now: they pull in torch, and a refused start should not wait for it.
    import uvicorn

    from app.api_runtime import build_runtime
    from app.main import create_app
    from app.runtime import StartupError, build_infra

    _logging(settings)
    if workers > 1:
        if settings.embedded:
            _fail("--workers: above 1 needs LOKID_REDIS_URL (one edit worker per model)")
        try:
            infra = build_infra(settings)  # refuse bad settings before forking
        except StartupError as error:
            _fail(str(error))
        _bootstrap_admin(settings, infra.factory)
        infra.close()
        # Each process loads its own serving model and follows the head on its own.
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=settings.log_level,
            log_config=None,  # keep the JSON (or text) handler set up above
            access_log=access_log,
        )
        return
    try:
        # Built before the server starts so a bad setting stops start-up with its message.
        runtime = build_runtime(settings)
    except StartupError as error:
        _fail(str(error))
    except Exception as error:
        _fail(f"start-up failed: {type(error).__name__}: {error}")
    _bootstrap_admin(settings, runtime.infra.factory)
    try:
        uvicorn.run(
            create_app(settings, runtime=runtime),
            host=host,
            port=port,
            log_level=settings.log_level,
            log_config=None,  # keep the JSON (or text) handler set up above
            access_log=access_log,
        )
    finally:
        runtime.close()


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty.")] = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
) -> None:
    """Run the edit worker: model resident, one job at a time, from the Redis queue."""
    from app.runtime import StartupError
    from workers import rq_main

    settings = _settings()
    _logging(settings)
    try:
        rq_main.run(settings, burst=burst, metrics_port=metrics_port)
    except StartupError as error:
        _fail(str(error))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from app.db import migrate

    settings = _settings()
    try:
        migrate.upgrade(settings.database_url, revision)
    except Exception as error:
        _fail(f"LOKID_DATABASE_URL: migration failed: {type(error).__name__}: {error}")
    console.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "base") -> None:
    """Undo migrations down to REVISION (default: an empty database)."""
    from app.db import migrate

    migrate.downgrade(_settings().database_url, revision)
    console.print(f"database at {revision}")


# -- API keys: straight to the database, so the first key needs no key ----------------------


@contextmanager
def _key_session() -> Iterator[Session]:
    from app.db import migrate
    from app.db.session import make_engine, make_session_factory

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        if settings.is_sqlite:
            migrate.upgrade(settings.database_url)  # embedded: nobody else migrates the file
        problem = migrate.pending(engine, settings.database_url)
        if problem:
            _fail(f"LOKID_DATABASE_URL: {problem}")
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A unique name for the key, e.g. ci.")],
    scope: Annotated[list[str], typer.Option(help="generate, edit or admin; repeat for several.")],
) -> None:
    """Create a key and print it once: only its hash is stored."""
    from app.services import keys
    from app.services.edits import Conflict

    with _key_session() as session:
        try:
            row, raw = keys.create_key(session, name, scope)
        except (keys.BadKeyRequest, Conflict) as error:
            _fail(str(error))
    sys.stdout.write(raw + "\n")
    Console(stderr=True).print(
        f"[dim]key {row.name!r} ({', '.join(row.scopes)}); shown once, store it now[/dim]",
        highlight=False,
    )


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    from app.services import keys
    from app.services.edits import NotFound

    with _key_session() as session:
        try:
            row = keys.revoke_key(session, name)
        except NotFound as error:
            _fail(str(error))
    console.print(f"key {row.name!r} revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")


@keys_app.command("list")
def keys_list() -> None:
    """Keys with their scopes and use; never the keys themselves."""
    from app.services import keys

    with _key_session() as session:
        rows = keys.list_keys(session)
    table = Table("name", "prefix", "scopes", "created", "last used", "revoked")
    for row in rows:
        table.add_row(
            row.name,
            row.prefix + "…",
            ",".join(row.scopes),
            f"{row.created_at:%Y-%m-%d %H:%M}",
            f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "",
            f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "",
        )
    console.print(table)


# -- client commands: they talk to a running API -------------------------------------------


def _client(api: str | None) -> httpx.Client:
    settings = _settings()
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else None
    return httpx.Client(base_url=api or settings.api_url, timeout=120, headers=headers)


def _call(api: str | None, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with _client(api) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        _fail(f"cannot reach the API: {error}")
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        text = detail if isinstance(detail, str) else json.dumps(detail)
        _fail(f"{response.status_code}: {text}")
    return response.json()


@app.command()
def edit(
    prompt: Annotated[str, typer.Argument(help="Prompt that contains the subject.")],
    subject: Annotated[str, typer.Option(help="Subject the fact is about.")],
    target: Annotated[str, typer.Option(help="The new answer.")],
    ground_truth: Annotated[str | None, typer.Option(help="The current answer.")] = None,
    note: Annotated[str | None, typer.Option(help="Free text kept with the edit.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the edit is finished.")] = True,
    api: ApiOption = None,
) -> None:
    """Submit one fact correction."""
    body = {"prompt": prompt, "subject": subject, "target_new": target}
    if ground_truth:
        body["ground_truth"] = ground_truth
    if note:
        body["note"] = note
    result = _call(api, "POST", "/v1/edits", json=body)
    while wait and result["status"] in ("queued", "running"):
        time.sleep(0.5)
        result = _call(api, "GET", f"/v1/edits/{result['id']}")
    console.print_json(data=result)
    if result["status"] in ("failed", "rejected"):
        raise typer.Exit(1)


@app.command()
def versions(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    api: ApiOption = None,
) -> None:
    """List versions, newest first; the head is marked."""
    result = _call(api, "GET", "/v1/versions", params={"limit": limit})
    table = Table("version", "parent", "head", "edits", "bytes", "created")
    for v in result["data"]:
        table.add_row(
            str(v["id"]),
            "" if v["parent"] is None else str(v["parent"]),
            "*" if v["is_head"] else "",
            ",".join(map(str, v["edit_ids"])),
            str(v["bytes_stored"]),
            v["created_at"],
        )
    console.print(table)
    console.print(f"head: {result['head']}")


@app.command()
def rollback(
    version: Annotated[int, typer.Argument(help="Version to make the head.")],
    api: ApiOption = None,
) -> None:
    """Make VERSION the head: generation serves it and later edits build on it."""
    console.print_json(data=_call(api, "POST", "/v1/rollback", json={"version": version}))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument()],
    max_new_tokens: Annotated[int, typer.Option()] = 32,
    temperature: Annotated[float, typer.Option()] = 0.0,
    api: ApiOption = None,
) -> None:
    """Generate a continuation of PROMPT with the head version."""
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature}
    result = _call(api, "POST", "/v1/generate", json=body)
    sys.stdout.write(result["text"] + "\n")
    console.print(f"[dim]version {result['version']}[/dim]", highlight=False)


if __name__ == "__main__":
    app()
