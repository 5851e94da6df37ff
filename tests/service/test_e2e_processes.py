"""The user's walk in production shape: `lokid serve` and `lokid worker` as separate processes
on Postgres and Redis, LOKI editing, driven by the `lokid` CLI and the official openai client."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.service.conftest import REDIS_URL, ROOT, counterfact, free_port, wait_for

LOKID = str(ROOT / ".venv" / "bin" / "lokid")
RECORD = counterfact()[1]  # "Autonomous University of Madrid, which is located in" → Sweden


class Processes:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [LOKID, *args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.running.append((name, proc))
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LOKID, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )

    def stop(self) -> None:
        for _, proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, proc in self.running:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.returncode is not None, name

    def dump(self) -> str:
        logs = sorted(self.logs.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in logs)


@pytest.fixture
def stack(pg_url: str, redis_db: redis.Redis, tmp_path: Path) -> Iterator[tuple[Processes, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LOKID_DATABASE_URL": pg_url,
        "LOKID_REDIS_URL": REDIS_URL,
        "LOKID_QUEUE_NAME": f"e2e_{secrets.token_hex(4)}",
        "LOKID_VERSION_STORE": str(tmp_path / "versions"),
        "LOKID_EDITOR": "loki",
        "LOKID_API_URL": url,
        "LOKID_TORCH_THREADS": "1",
    }
    procs = Processes(env, tmp_path)
    upgrade = procs.cli("db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    server = procs.start("serve", "serve", "--port", str(port))
    worker = procs.start("worker", "worker")

    def ready() -> bool:
        for name, proc in (("serve", server), ("worker", worker)):
            assert proc.poll() is None, f"{name} exited early\n{procs.dump()}"
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 180, "lokid serve to be ready", every=0.5)
        yield procs, url
    except BaseException:
        print(procs.dump())
        raise
    finally:
        procs.stop()


def test_edit_serve_rollback_walk_with_separate_processes(stack: tuple[Processes, str]) -> None:
    procs, url = stack
    ai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask() -> tuple[str, str | None]:
        out = ai.completions.create(
            model="lokid", prompt=RECORD["prompt"], max_tokens=8, temperature=0
        )
        return out.choices[0].text, out.system_fingerprint

    before, fingerprint = ask()
    assert fingerprint == "v0" and RECORD["target_new"] not in before

    edited = procs.cli(
        "edit",
        "--subject",
        RECORD["subject"],
        "--target",
        RECORD["target_new"],
        "--ground-truth",
        RECORD["ground_truth"],
        RECORD["prompt"],
    )
    assert edited.returncode == 0, edited.stdout + edited.stderr + procs.dump()
    edit = json.loads(edited.stdout)
    assert edit["status"] == "applied" and edit["metrics"]["method"] == "loki"
    version = edit["version"]

    # the worker announced the head; the API process follows it within a second or so
    def served() -> tuple[str, str | None] | None:
        answer = ask()
        return answer if answer[1] == f"v{version}" else None

    after, _ = wait_for(served, 10, f"the API to serve v{version}", every=0.1)
    assert after.strip().startswith(RECORD["target_new"]), after

    listed = procs.cli("versions")
    assert listed.returncode == 0 and f"head: {version}" in listed.stdout

    rolled = procs.cli("rollback", "0")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert json.loads(rolled.stdout)["serving"] == 0
    again, fingerprint = ask()
    assert fingerprint == "v0" and again == before

    generated = procs.cli("generate", "--max-new-tokens", "8", RECORD["prompt"])
    assert generated.returncode == 0 and generated.stdout.startswith(before)
    assert "version 0" in generated.stdout

    refused = procs.cli("edit", "--subject", "Nobody", "--target", "x", RECORD["prompt"])
    assert refused.returncode == 2 and "422" in refused.stdout
    with httpx.Client(base_url=url) as client:
        statuses = client.get("/v1/edits").json()["data"]
        assert [e["status"] for e in statuses] == ["reverted"]
        assert client.get("/readyz").json()["checks"]["queue"] == "ok"
