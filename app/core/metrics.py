"""Prometheus metrics shared by the API and the worker (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EDITS_SUBMITTED = Counter("lokid_edits_submitted_total", "Edits accepted by the API")
EDITS_FINISHED = Counter(
    "lokid_edits_finished_total", "Edit jobs finished by this worker", ["status"]
)
EDIT_SECONDS = Histogram(
    "lokid_edit_seconds",
    "Seconds from claiming an edit job to committing its version",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)
VERSION_BYTES = Histogram(
    "lokid_version_bytes",
    "Bytes stored per new version",
    buckets=(1e3, 1e4, 1e5, 1e6, 1e7, 1e8),
)
SERVING_VERSION = Gauge("lokid_serving_version", "Version the serving model holds")
HEAD_SWITCH_SECONDS = Histogram(
    "lokid_head_switch_seconds",
    "Seconds to prepare and install a new version in the serving model",
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
GENERATED_TOKENS = Counter("lokid_generated_tokens_total", "Tokens generated", ["endpoint"])
GENERATION_SECONDS = Histogram(
    "lokid_generation_seconds",
    "Seconds per generation request",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
ROLLBACKS = Counter("lokid_rollbacks_total", "Rollbacks performed")
GENERATION_TOKENS_PER_SECOND = Histogram(
    "lokid_generation_tokens_per_second",
    "Generated tokens per second of one request",
    ["endpoint"],
    buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
)
