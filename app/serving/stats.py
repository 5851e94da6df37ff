"""Recent generation requests of this process, for the dashboard's requests and tokens/s."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    seconds: float
    requests: int
    tokens: int
    tokens_per_second: float | None  # generated tokens over the time spent generating them


class GenerationStats:
    def __init__(self, horizon: float = 3600.0, max_samples: int = 100_000) -> None:
        self.horizon = horizon
        self._samples: deque[tuple[float, int, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def record(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._samples.append((time.monotonic(), tokens, seconds))

    def window(self, seconds: float) -> Window:
        since = time.monotonic() - seconds
        with self._lock:
            while self._samples and self._samples[0][0] < time.monotonic() - self.horizon:
                self._samples.popleft()
            recent = [s for s in self._samples if s[0] >= since]
        tokens = sum(t for _, t, _ in recent)
        busy = sum(s for _, _, s in recent)
        rate = tokens / busy if busy > 0 else None
        return Window(seconds, len(recent), tokens, rate)
