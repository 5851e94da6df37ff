"""Service benchmark: the four targets of the service, measured on the production shape.

    python -m bench.service --out results/service/

1. POST /v1/edits → the new version served (a generation names it), minus the edit's own time.
2. POST /v1/rollback → the old version served.
3. Bytes stored per single-edit version, against one edited matrix in fp32.
4. POST /v1/edits requests/s against Postgres (wrk on loopback, no edit worker running).
5. /v1/generate tokens/s against plain ``model.generate`` (same model, prompt and settings,
   alternated in one run).

Starts its own `lokid serve` / `lokid worker` processes on a fresh Postgres database and Redis
db 14; writes results.json and results.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
LOKID = str(ROOT / ".venv" / "bin" / "lokid")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "train.json"
POST_BODY = {"prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano"}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def database() -> Iterator[str]:
    name = f"lokid_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stack:
    """`lokid` processes sharing one environment; stopped (SIGINT) on exit."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str) -> None:
        subprocess.run([LOKID, *args], env=self.env, cwd=ROOT, check=True, capture_output=True)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen([LOKID, *args], env=self.env, cwd=ROOT, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(root: int) -> float:
    """User+system CPU seconds of process ``root`` and all its descendants."""
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])))
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(stats[pid][1] for pid in tree if pid in stats) / tick


# -- 4. ingest rate ------------------------------------------------------------------------


def ingest(env: dict[str, str], logs: Path, seconds: int, connections: int, workers: int) -> dict:
    if shutil.which("wrk") is None:
        raise RuntimeError("the ingest benchmark needs wrk (apt-get install wrk)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(env, logs)
    try:
        server = stack.start(
            "ingest-serve", "serve", "--port", str(port), "--workers", str(workers)
        )
        wait_ready(url)
        script = logs / "post.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(json.dumps(POST_BODY))}\n"
        )
        target = f"{url}/v1/edits"
        subprocess.run(
            ["wrk", "-t1", "-c8", "-d2s", "-s", str(script), target],
            capture_output=True,
            check=True,
        )  # warm-up
        before_cpu = cpu_seconds(server.pid)
        load_before = os.getloadavg()[0]
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(script),
                target,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        used = cpu_seconds(server.pid) - before_cpu
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        p50 = re.search(r"50%\s+(\S+)", out)
        p99 = re.search(r"99%\s+(\S+)", out)
        return {
            "requests_per_s": rate,
            "requests": requests,
            "errors": int(non2xx.group(1)) if non2xx else 0,
            "latency_p50": p50.group(1) if p50 else None,
            "latency_p99": p99.group(1) if p99 else None,
            "api_processes": workers,
            "connections": connections,
            "api_cpu_ms_per_request": round(1000 * used / max(requests, 1), 3),
            # what one API process could take with a core to itself
            "one_core_capacity_per_s": round(requests / used) if used else None,
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
            "cpu_cores": os.cpu_count(),
        }
    finally:
        stack.stop()


# -- 1–3, 5: edits, rollbacks, bytes, generation ----------------------------------------


def generate(client: httpx.Client, prompt: str, n: int = 1) -> dict[str, Any]:
    body = {"prompt": prompt, "max_new_tokens": n}
    response = client.post("/v1/generate", json=body)
    response.raise_for_status()
    return response.json()


def edits_and_rollbacks(client: httpx.Client, records: list[dict[str, Any]]) -> dict:
    matrix_bytes = None
    results = []
    for record in records:
        body = {k: record[k] for k in ("prompt", "subject", "target_new", "ground_truth")}
        served_before = generate(client, record["prompt"])["version"]
        started = time.perf_counter()
        edit = client.post("/v1/edits", json=body).json()
        while True:  # until a generation is answered by a newer version
            answer = generate(client, record["prompt"])
            if answer["version"] != served_before:
                served_at = time.perf_counter()
                break
            time.sleep(0.02)
        while edit["status"] in ("queued", "running"):
            edit = client.get(f"/v1/edits/{edit['id']}").json()
        assert edit["status"] == "applied", edit
        version = client.get(f"/v1/versions/{edit['version']}").json()
        if matrix_bytes is None:
            matrix_bytes = _matrix_bytes(client)
        results.append(
            {
                "edit": edit["id"],
                "version": edit["version"],
                "post_to_served_s": round(served_at - started, 3),
                "edit_seconds": edit["metrics"]["seconds"],
                "overhead_s": round(served_at - started - edit["metrics"]["seconds"], 3),
                "layers": edit["layers"],
                "bytes_stored": version["bytes_stored"],
                "blobs": {b["kind"]: b["bytes"] for b in version["blobs"]},
                "bytes_vs_fp32_matrix": round(version["bytes_stored"] / matrix_bytes, 4),
                "delta_bytes_vs_fp32_matrix": round(
                    sum(b["bytes"] for b in version["blobs"] if b["kind"] == "delta")
                    / matrix_bytes,
                    4,
                ),
                "answer": answer["text"],
            }
        )
        log(
            f"edit {edit['id']} → v{edit['version']}: served after "
            f"{results[-1]['post_to_served_s']}s (edit itself {edit['metrics']['seconds']}s), "
            f"{version['bytes_stored']} bytes"
        )
    rollbacks = []
    for target in [*[r["version"] for r in results][-2::-1], 0]:
        started = time.perf_counter()
        rolled = client.post("/v1/rollback", json={"version": target}).json()
        answer = generate(client, records[0]["prompt"])
        elapsed = time.perf_counter() - started
        assert answer["version"] == target == rolled["serving"], (answer, rolled)
        rollbacks.append({"to": target, "rollback_to_served_s": round(elapsed, 4)})
    return {"edits": results, "rollbacks": rollbacks, "fp32_matrix_bytes": matrix_bytes}


def _matrix_bytes(client: httpx.Client) -> int:
    from transformers import AutoConfig

    from workers.editing.model import materialise_bundled

    config = AutoConfig.from_pretrained(materialise_bundled())
    return int(config.hidden_size * config.intermediate_size * 4)


def generation_speed(client: httpx.Client, threads: int, rounds: int, tokens: int) -> dict:
    import torch

    from workers.editing.model import load_model

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model()
    tok, model = loaded.tokenizer, loaded.model
    prompt = "The history of the city of Madrid begins"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def plain() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)

    def served() -> float:
        started = time.perf_counter()
        body = {"prompt": prompt, "max_new_tokens": tokens}
        out = client.post("/v1/generate", json=body).json()
        return out["usage"]["completion_tokens"] / (time.perf_counter() - started)

    plain(), served()  # warm-up
    plain_rates, served_rates = [], []
    for _ in range(rounds):  # alternate, so drifting machine load hits both alike
        plain_rates.append(plain())
        served_rates.append(served())
    ratio = statistics.median(served_rates) / statistics.median(plain_rates)
    return {
        "tokens": tokens,
        "rounds": rounds,
        "plain_tokens_per_s": [round(r, 2) for r in plain_rates],
        "served_tokens_per_s": [round(r, 2) for r in served_rates],
        "median_ratio": round(ratio, 4),
    }


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    edits = results["edits"]["edits"]
    axes[0].bar([f"v{e['version']}" for e in edits], [e["overhead_s"] for e in edits])
    axes[0].axhline(1.0, color="red", linestyle="--", label="target 1 s")
    axes[0].set_title("POST → served, minus edit time (s)")
    axes[0].legend()
    rollbacks = results["edits"]["rollbacks"]
    axes[1].bar([f"→v{r['to']}" for r in rollbacks], [r["rollback_to_served_s"] for r in rollbacks])
    axes[1].axhline(1.0, color="red", linestyle="--")
    axes[1].set_title("rollback → served (s)")
    percent = [100 * e["bytes_vs_fp32_matrix"] for e in edits]
    axes[2].bar([f"v{e['version']}" for e in edits], percent)
    axes[2].axhline(10, color="red", linestyle="--")
    axes[2].set_title("bytes per version, % of an fp32 matrix")
    if "ingest" in results:
        axes[3].bar(["POST /v1/edits"], [results["ingest"]["requests_per_s"]])
        axes[3].axhline(500, color="red", linestyle="--")
        axes[3].set_title("requests/s")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "service")
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--editor", default="loki")
    parser.add_argument("--load-seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--gen-rounds", type=int, default=5)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument(
        "--torch-threads", type=int, default=int(os.environ.get("LOKID_TORCH_THREADS", "0"))
    )
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="lokid-bench-"))
    records = json.loads(COUNTERFACT.read_text())[: args.edits]
    base_env = {
        **os.environ,
        "LOKID_REDIS_URL": "redis://127.0.0.1:6379/14",
        "LOKID_EDITOR": args.editor,
        "LOKID_TORCH_THREADS": str(args.torch_threads),
    }
    results: dict[str, Any] = {"argv": sys.argv[1:], "started": time.strftime("%F %T")}
    if not args.skip_ingest:
        with database() as url:
            env = base_env | {
                "LOKID_DATABASE_URL": url,
                "LOKID_QUEUE_NAME": f"bench_{secrets.token_hex(4)}",
                "LOKID_VERSION_STORE": str(logs / "ingest-versions"),
            }
            Stack(env, logs).run("db", "upgrade")
            log(f"ingest: wrk, {args.connections} connections, {args.load_seconds}s")
            results["ingest"] = ingest(
                env, logs, args.load_seconds, args.connections, args.api_workers
            )
            log(f"ingest: {results['ingest']}")
            import redis

            redis.Redis.from_url(env["LOKID_REDIS_URL"]).flushdb()
    with database() as url:
        port = free_port()
        env = base_env | {
            "LOKID_DATABASE_URL": url,
            "LOKID_QUEUE_NAME": f"bench_{secrets.token_hex(4)}",
            "LOKID_VERSION_STORE": str(logs / "versions"),
        }
        stack = Stack(env, logs)
        stack.run("db", "upgrade")
        try:
            stack.start("serve", "serve", "--port", str(port))
            stack.start("worker", "worker")
            base = f"http://127.0.0.1:{port}"
            wait_ready(base)
            with httpx.Client(base_url=base, timeout=600) as client:
                results["edits"] = edits_and_rollbacks(client, records)
                log("generation speed: plain model.generate vs /v1/generate")
                results["generation"] = generation_speed(
                    client, args.torch_threads, args.gen_rounds, args.gen_tokens
                )
        finally:
            stack.stop()
    results["load_average_end"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out)
    log(f"wrote {args.out / 'results.json'} and results.png (logs in {logs})")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
