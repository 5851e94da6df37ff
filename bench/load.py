"""Bounded load test: concurrent generation clients, a steady stream of edits and a rollback in
the middle, against `lokid serve` + `lokid worker` on Postgres and Redis (loopback).

    python -m bench.load --duration 300 --out results/load/
    python -m bench.load --url http://127.0.0.1:8000 --duration 10 --out /tmp/load/

Without --url it starts its own stack: a fresh Postgres database, a private redis-server on a
free port, one API process and one edit worker (editor: --editor, by default the fast rank-one
test editor; `loki` for the real one). Writes results.json and load.png under --out: requests/s,
p50/p99 latency, errors and 5xx over time, and edits POSTed against edits in a terminal state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.private_redis import PrivateRedis
from bench.service import COUNTERFACT, ROOT, Stack, database, free_port, log, wait_ready

TERMINAL = {"applied", "failed", "rejected", "reverted"}
RANK_ONE = "tests.service.rank_one:RankOneEditor"
GENERATION = {"generate", "chat"}


@dataclass
class Sample:
    at: float  # seconds since the start of the load
    endpoint: str
    status: int  # 0: no answer (connection error or timeout)
    seconds: float


@dataclass
class Run:
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    edits: list[int] = field(default_factory=list)
    edit_refused: Counter[int] = field(default_factory=Counter)
    rollback: dict[str, Any] | None = None
    terminal_over_time: list[tuple[float, int]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    async def call(
        self, client: httpx.AsyncClient, endpoint: str, method: str, path: str, **kw: Any
    ) -> httpx.Response | None:
        began = time.monotonic()
        try:
            response = await client.request(method, path, **kw)
        except httpx.HTTPError:
            self.samples.append(Sample(began - self.started, endpoint, 0, 0.0))
            return None
        took = time.monotonic() - began
        self.samples.append(Sample(began - self.started, endpoint, response.status_code, took))
        return response


async def generation_client(
    run: Run, client: httpx.AsyncClient, prompts: list[str], until: float, tokens: int, seed: int
) -> None:
    rng = random.Random(seed)
    while run.now() < until:
        prompt = rng.choice(prompts)
        if rng.random() < 0.5:
            body = {"prompt": prompt, "max_new_tokens": tokens}
            await run.call(client, "generate", "POST", "/v1/generate", json=body)
        else:
            chat = {
                "model": "lokid",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": tokens,
                "temperature": 0,
            }
            await run.call(client, "chat", "POST", "/v1/chat/completions", json=chat)


async def edit_stream(
    run: Run, client: httpx.AsyncClient, records: list[dict[str, Any]], until: float, every: float
) -> None:
    for record in records:
        if run.now() >= until:
            return
        body = {k: record[k] for k in ("prompt", "subject", "target_new", "ground_truth")}
        response = await run.call(client, "edit", "POST", "/v1/edits", json=body)
        if response is not None and response.status_code == 202:
            run.edits.append(response.json()["id"])
        elif response is not None:
            run.edit_refused[response.status_code] += 1
        await asyncio.sleep(every)


async def rollback_midway(run: Run, client: httpx.AsyncClient, at: float, until: float) -> None:
    """At ``at`` (or once the first edit is applied), roll the head back to its parent."""
    await asyncio.sleep(max(0.0, at - run.now()))
    while True:
        head = await run.call(client, "versions", "GET", "/v1/versions/head")
        if head is not None and head.status_code == 200 and head.json()["parent"] is not None:
            break
        if run.now() >= until:
            run.rollback = {"skipped": "no edit was applied, so nothing to roll back"}
            return
        await asyncio.sleep(1)
    target = head.json()["parent"]
    response = await run.call(client, "rollback", "POST", "/v1/rollback", json={"version": target})
    run.rollback = {
        "at_s": round(run.now(), 1),
        "from": head.json()["id"],
        "to": target,
        "status": None if response is None else response.status_code,
        "seconds": run.samples[-1].seconds,
    }


async def terminal_count(client: httpx.AsyncClient, ids: list[int]) -> int:
    done = 0
    for start in range(0, len(ids), 50):
        chunk = ids[start : start + 50]
        answers = await asyncio.gather(*(client.get(f"/v1/edits/{i}") for i in chunk))
        done += sum(1 for a in answers if a.status_code == 200 and a.json()["status"] in TERMINAL)
    return done


async def watch_edits(run: Run, client: httpx.AsyncClient, until: float) -> None:
    while run.now() < until:
        await asyncio.sleep(5)
        try:
            done = await terminal_count(client, list(run.edits))
        except httpx.HTTPError:
            continue
        run.terminal_over_time.append((run.now(), done))


async def load(args: argparse.Namespace, url: str) -> tuple[Run, dict[str, Any]]:
    records = json.loads(Path(args.data).read_text())
    rng = random.Random(0)
    rng.shuffle(records)
    prompts = [r["prompt"] for r in records[:200]]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=limits, headers=headers
    ) as client:
        run = Run()
        until = args.duration
        tasks = [
            generation_client(run, client, prompts, until, args.tokens, seed)
            for seed in range(args.clients)
        ]
        tasks.append(edit_stream(run, client, records[200:], until, args.edit_every))
        tasks.append(rollback_midway(run, client, until / 2, until))
        tasks.append(watch_edits(run, client, until))
        await asyncio.gather(*tasks)
        load_seconds = run.now()
        log(f"load over after {load_seconds:.0f}s; waiting for {len(run.edits)} edits to finish")
        drain_until = run.now() + args.drain
        while True:
            done = await terminal_count(client, list(run.edits))
            run.terminal_over_time.append((run.now(), done))
            if done == len(run.edits) or run.now() > drain_until:
                break
            await asyncio.sleep(2)
        if run.rollback and "skipped" in run.rollback:
            # A short run on a slow machine may apply its first edit only after the load: the
            # rollback is still exercised, and said to be late.
            await rollback_midway(run, client, 0, run.now() + 30)
            if run.rollback and "skipped" not in run.rollback:
                run.rollback["after_load"] = True
        statuses: Counter[str] = Counter()
        for i in run.edits:
            statuses[(await client.get(f"/v1/edits/{i}")).json()["status"]] += 1
    return run, {"load_seconds": load_seconds, "edit_statuses": dict(statuses)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(run: Run, extra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    samples, seconds = run.samples, extra["load_seconds"]
    by_endpoint: dict[str, Any] = {}
    for endpoint in sorted({s.endpoint for s in samples}):
        mine = [s for s in samples if s.endpoint == endpoint]
        ok = [s.seconds for s in mine if 200 <= s.status < 300]
        by_endpoint[endpoint] = {
            "requests": len(mine),
            "ok": len(ok),
            "p50_s": percentile(ok, 0.50),
            "p99_s": percentile(ok, 0.99),
            "statuses": dict(Counter(s.status for s in mine)),
        }
    ok_all = [s.seconds for s in samples if 200 <= s.status < 300]
    terminal = run.terminal_over_time[-1][1] if run.terminal_over_time else 0
    return {
        "config": {
            k: getattr(args, k) for k in ("duration", "clients", "tokens", "edit_every", "editor")
        },
        "load_seconds": round(seconds, 1),
        "requests": len(samples),
        "requests_per_s": round(len(samples) / seconds, 2),
        "p50_s": percentile(ok_all, 0.50),
        "p99_s": percentile(ok_all, 0.99),
        "errors": sum(1 for s in samples if not 200 <= s.status < 300),
        "server_errors_5xx": sum(1 for s in samples if s.status >= 500),
        "no_answer": sum(1 for s in samples if s.status == 0),
        "rate_limited_429": sum(1 for s in samples if s.status == 429),
        "by_endpoint": by_endpoint,
        "edits_posted": len(run.edits),
        "edits_refused_by_status": dict(run.edit_refused),
        "edits_terminal": terminal,
        "edit_statuses": extra["edit_statuses"],
        "rollback": run.rollback,
    }


def plot(run: Run, summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = int(summary["load_seconds"]) + 1
    per_second = Counter(int(s.at) for s in run.samples)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot(range(span), [per_second.get(t, 0) for t in range(span)], lw=0.8)
    ax.set(title=f"requests/s (mean {summary['requests_per_s']})", xlabel="s")
    ax = axes[0][1]
    bins = range(0, span, 10)
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        values = []
        for start in bins:
            ok = [
                s.seconds
                for s in run.samples
                if start <= s.at < start + 10 and s.status < 300 and s.endpoint in GENERATION
            ]
            values.append(percentile(ok, q) or float("nan"))
        ax.plot(list(bins), values, label=label)
    if run.rollback and "at_s" in run.rollback:
        ax.axvline(run.rollback["at_s"], color="grey", ls="--", label="rollback")
    ax.set(title="generation latency, successful requests (10 s bins)", xlabel="s", ylabel="s")
    ax.legend()
    ax = axes[1][0]
    errors = sorted(s.at for s in run.samples if not 200 <= s.status < 300)
    fives = sorted(s.at for s in run.samples if s.status >= 500)
    ax.step(errors, range(1, len(errors) + 1), where="post", label="errors (non-2xx, no answer)")
    ax.step(fives, range(1, len(fives) + 1), where="post", label="5xx")
    ax.set(title=f"errors: {summary['errors']}, 5xx: {summary['server_errors_5xx']}", xlabel="s")
    ax.legend()
    ax = axes[1][1]
    posted = sorted(s.at for s in run.samples if s.endpoint == "edit" and s.status == 202)
    ax.step(posted, range(1, len(posted) + 1), where="post", label="edits POSTed")
    if run.terminal_over_time:
        times, done = zip(*run.terminal_over_time, strict=True)
        ax.plot(times, done, label="edits terminal")
    ax.set(
        title=f"edits: {summary['edits_posted']} posted, {summary['edits_terminal']} terminal",
        xlabel="s",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=110)


def own_stack(args: argparse.Namespace, logs: Path) -> tuple[Stack, str, Any]:
    """`lokid serve` + `lokid worker` on a fresh database and a private redis-server."""
    db = database()
    db_url = db.__enter__()
    redis_server = PrivateRedis()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LOKID_DATABASE_URL": db_url,
        "LOKID_REDIS_URL": redis_server.url,
        "LOKID_VERSION_STORE": str(logs / "versions"),
        "LOKID_EDITOR": RANK_ONE if args.editor == "rank-one" else args.editor,
        "LOKID_TORCH_THREADS": os.environ.get("LOKID_TORCH_THREADS", "1"),
        "LOKID_RATE_LIMIT": args.rate_limit,
    }
    stack = Stack(env, logs)
    stack.run("db", "upgrade")
    stack.start("worker", "worker")
    stack.start("api", "serve", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)

    def close() -> None:
        stack.stop()
        redis_server.close()
        db.__exit__(None, None, None)

    return stack, url, close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load")
    parser.add_argument("--clients", type=int, default=4, help="concurrent generation clients")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--edit-every", type=float, default=2.0, help="seconds between edits")
    parser.add_argument("--drain", type=float, default=300, help="seconds to wait for edits")
    parser.add_argument("--editor", default="rank-one", help="rank-one (fast test editor), loki")
    parser.add_argument("--rate-limit", default="off", help="LOKID_RATE_LIMIT of its own stack")
    parser.add_argument("--url", help="load a running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("LOKID_API_KEY"))
    parser.add_argument("--data", default=str(COUNTERFACT))
    parser.add_argument("--out", type=Path, default=Path("results/load"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    close = None
    if args.url:
        url = args.url
    else:
        _, url, close = own_stack(args, args.out)
    try:
        log(f"loading {url} for {args.duration:.0f}s with {args.clients} generation clients")
        run, extra = asyncio.run(load(args, url))
    finally:
        if close is not None:
            close()
    summary = summarise(run, extra, args)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(run, summary, args.out)
    keys = ("requests_per_s", "p50_s", "p99_s", "errors", "server_errors_5xx")
    log(", ".join(f"{k}={summary[k]}" for k in keys))
    log(f"edits posted {summary['edits_posted']}, terminal {summary['edits_terminal']}")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'load.png'}")


if __name__ == "__main__":
    main()
