"""Announcing a new head version to every server: Redis pub/sub, or callbacks in one process.

A message is only a hint to look now; servers read the head from the database, so a lost or
stale message can delay a switch (until the next poll) but never cause a wrong one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from redis import Redis

log = logging.getLogger(__name__)
Listener = Callable[[int], None]


class HeadBus(Protocol):
    def publish(self, version: int) -> None: ...

    def listen(self, callback: Listener, stop: threading.Event) -> None:
        """Call ``callback`` for each announcement until ``stop`` is set (blocking)."""
        ...


class LocalBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def publish(self, version: int) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(version)

    def listen(self, callback: Listener, stop: threading.Event) -> None:
        with self._lock:
            self._listeners.append(callback)
        stop.wait()
        with self._lock:
            self._listeners.remove(callback)


class RedisBus:
    def __init__(self, redis: Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel

    def publish(self, version: int) -> None:
        try:
            self.redis.publish(self.channel, str(version))
        except Exception:  # the database already holds the head; pollers will catch up
            log.warning("could not announce head %s on %s", version, self.channel, exc_info=True)

    def listen(self, callback: Listener, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and message.get("type") == "message":
                        callback(int(message["data"]))
                pubsub.close()
            except Exception:
                log.warning("head subscription lost; retrying", exc_info=True)
                stop.wait(1.0)
