"""All run-time settings in one object, read from ``LOKID_*`` environment variables.

Bad values stop start-up with a message that names the environment variable, so an operator
never has to guess which setting was wrong.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import limits
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

ENV_PREFIX = "LOKID_"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Embedded default: a SQLite file under ./var and the worker on a thread in the API process.
    database_url: str = "sqlite:///./var/lokid.db"
    redis_url: str | None = None
    model: str = "bundled"
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    version_store: Path = Path("./var/versions")
    editor: str = "loki"
    # Fields of the method's config, as JSON: {"trim_min_prob": 0.5} (loki-log.md, "Trim"). Unknown
    # names and values of the wrong kind stop start-up here; ranges that depend on the model
    # (a layer index, ...) stop the worker when it builds the editor.
    editor_options: dict[str, str] = Field(default_factory=dict)
    # A full copy of a matrix after every K deltas to it bounds the work of materialising it;
    # 64 keeps the amortised keyframe cost per version to a few percent of one matrix.
    keyframe_every: int = Field(default=64, ge=1, le=10_000)
    # Editor state grows by appends that are cheap to replay: write it whole less often.
    state_keyframe_every: int = Field(default=256, ge=1, le=100_000)
    queue_name: str = Field(default="edits", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    job_timeout: int = Field(default=900, ge=10, le=86_400)
    reconcile_interval: float = Field(default=30.0, gt=0)
    # A queued edit younger than this is assumed to be on its way through the queue.
    reconcile_grace: float = Field(default=10.0, ge=0)
    head_poll_interval: float = Field(default=2.0, gt=0)
    # An edit whose worker died this many times while applying it is marked failed.
    max_attempts: int = Field(default=3, ge=1, le=100)
    # How often the worker holding the model's lease checks that it still holds it.
    lease_check_interval: float = Field(default=5.0, gt=0, le=300)
    # An editor that cannot make the target top-1 changes weights for nothing: refuse it.
    reject_unsuccessful: bool = True
    api_url: str = "http://127.0.0.1:8000"
    # The key the client commands (lokid edit, generate, ...) send to LOKID_API_URL.
    api_key: str | None = None
    # 0 keeps torch's default (one thread per core). On a CPU shared with other busy processes
    # fewer threads are much faster: oversubscribed OpenMP threads spin-wait on each other.
    torch_threads: int = Field(default=0, ge=0, le=512)
    # open: every caller may do everything (the embedded default; loopback only).
    # keys: every /v1 call needs an API key with the route's scope (`lokid keys create`).
    auth: Literal["open", "keys"] = "open"
    # Limits on one request. A body is refused (413) before it is read in full; the others
    # are counted in the serving model's tokens and refused with 422.
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=1 << 30)
    max_prompt_tokens: int = Field(default=2048, ge=1, le=1_000_000)
    max_target_tokens: int = Field(default=32, ge=1, le=4096)
    max_batch: int = Field(default=100, ge=1, le=10_000)
    max_new_tokens: int = Field(default=512, ge=1, le=100_000)
    # Requests each caller (API key, or client address in open mode) may make in a moving
    # window, in the `limits` library's notation; "off" turns it off. Counted per API process.
    rate_limit: str = "100/2 seconds"

    # Edit guard and model health, measured by the worker after every edit (see
    # workers/editing/health.py). Canaries: a JSON list of {prompt, answer} the base model knows.
    canaries: Path | None = None  # None = the bundled workers/editing/data/canaries.json
    health_text_tokens: int = Field(default=96, ge=16, le=8192)
    edit_guard: bool = True
    # Share of the canaries the model answered before an edit that it may get wrong after it.
    guard_max_canaries_broken: float = Field(default=0.25, ge=0.0, le=1.0)
    # Fixed-text perplexity after an edit may be at most this multiple of the one before it.
    guard_max_perplexity_ratio: float = Field(default=1.10, ge=1.0, le=100.0)
    # Greedy tokens generated from each edit's prompt before and after it (0: do not probe).
    probe_tokens: int = Field(default=8, ge=0, le=256)
    heartbeat_interval: float = Field(default=5.0, gt=0, le=3600)

    # Logs: one JSON object per line (edit id and version on every line about an edit) or text.
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Admin dashboard sessions: signed cookies; the secret is read from (or created in) the
    # file unless given, so every API process on one volume accepts the same sessions.
    session_secret: SecretStr | None = None
    session_secret_file: Path = Path("./var/session-secret")
    session_hours: float = Field(default=12.0, gt=0, le=24 * 90)
    # Secure cookies are sent over HTTPS only: turn on behind TLS.
    cookie_secure: bool = False
    # Print a new admin key at start-up when the database holds none (first `make run`).
    bootstrap_admin_key: bool = True

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value.startswith("postgresql+psycopg://") or value.startswith("sqlite://"):
            return value
        if value.startswith(("postgres://", "postgresql://")):
            raise ValueError("use the psycopg 3 driver: postgresql+psycopg://user@host/db")
        raise ValueError("must start with postgresql+psycopg:// or sqlite://")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (or be unset)")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value in ("", "bundled"):
            return "bundled"
        if not (Path(value) / "config.json").is_file():
            raise ValueError(f"{value!r} is not a Hugging Face model directory (no config.json)")
        return value

    @field_validator("canaries")
    @classmethod
    def _canaries(cls, value: Path | None) -> Path | None:
        if value in (None, Path("")):
            return None
        from workers.editing.health import load_canaries

        load_canaries(value)  # refuses a missing or malformed file, naming the problem
        return value

    @field_validator("session_secret")
    @classmethod
    def _session_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (or unset: a file is created)")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("editor")
    @classmethod
    def _editor(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.]+(:[A-Za-z0-9_]+)?$", value):
            raise ValueError("must be a method name (loki, ...) or module.path:EditorClass")
        return value

    @field_validator("editor_options", mode="before")
    @classmethod
    def _options_as_literals(cls, value: object) -> object:
        # JSON numbers, booleans and null become the Python literals the config parser reads
        if isinstance(value, dict):
            return {k: v if isinstance(v, str) else repr(v) for k, v in value.items()}
        return value

    @field_validator("editor_options")
    @classmethod
    def _editor_options(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        editor = info.data.get("editor")
        if value and editor is not None:
            from workers.editors import check_options  # torch: only when options are set

            check_options(editor, value)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        if value.strip().lower() in ("off", "0", ""):
            return "off"
        try:
            limits.parse(value)
        except ValueError:
            raise ValueError(
                "must be like '100/2 seconds', '50/second' or '3000 per minute', or 'off'"
            ) from None
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def embedded(self) -> bool:
        """No Redis: dispatch in-process and run the worker on a thread of the API process."""
        return self.redis_url is None

    @property
    def canaries_path(self) -> Path:
        from workers.editing.health import DEFAULT_CANARIES

        return self.canaries or DEFAULT_CANARIES

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def bind_problem(self, host: str) -> str | None:
        """Why this server must not listen on ``host``, or None when it may."""
        if self.auth == "open" and not is_loopback(host):
            return (
                f"LOKID_AUTH=open lets anyone do anything, so it serves 127.0.0.1 only, not "
                f"{host!r}: set LOKID_AUTH=keys and create keys with `lokid keys create`"
            )
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


class SettingsError(ValueError):
    """Settings refused; the message names each offending environment variable."""


def describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{ENV_PREFIX}{field.upper()}: {message}")
    return "\n".join(lines)


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(describe(error)) from None
    except PydanticSettingsError as error:  # a JSON setting that is not JSON
        match = re.search(r'field "(\w+)"', str(error))
        name = match.group(1).upper() if match else "?"
        raise SettingsError(f"{ENV_PREFIX}{name}: not valid JSON ({error.__cause__})") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
