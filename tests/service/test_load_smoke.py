"""A short run of bench/load.py against an embedded server: the script works end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.service.conftest import ROOT, Server


def test_load_script_smoke(embedded: Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(ROOT / ".venv/bin/python"),
            "-m",
            "bench.load",
            "--url",
            embedded.url,
            "--duration",
            "6",
            "--clients",
            "1",
            "--tokens",
            "4",
            "--edit-every",
            "2",
            "--drain",
            "60",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["requests"] > 0 and summary["server_errors_5xx"] == 0
    assert summary["edits_posted"] >= 2 and summary["edits_terminal"] == summary["edits_posted"]
    assert summary["rollback"] and summary["rollback"].get("status") == 200, summary["rollback"]
    assert (tmp_path / "load.png").stat().st_size > 10_000
