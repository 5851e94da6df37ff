"""Per-caller rate limits: a moving window per API key (or client address in open mode)."""

from __future__ import annotations

import math
import time

import limits
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from app.core.config import Settings


class RateLimited(Exception):
    """The caller spent its window (HTTP 429); ``retry_after`` is whole seconds to wait."""

    def __init__(self, identity: str, limit: str, retry_after: int) -> None:
        super().__init__(f"rate limit of {limit} exceeded for {identity}; retry in {retry_after} s")
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, limit: str) -> None:
        self.item = limits.parse(limit)
        self.text = limit
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    @classmethod
    def of(cls, settings: Settings) -> RateLimiter | None:
        return None if settings.rate_limit == "off" else cls(settings.rate_limit)

    def check(self, identity: str) -> None:
        if self.limiter.hit(self.item, identity):
            return
        reset = self.limiter.get_window_stats(self.item, identity).reset_time
        raise RateLimited(identity, self.text, max(1, math.ceil(reset - time.time())))
