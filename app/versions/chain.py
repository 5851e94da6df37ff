"""The version tree as plain data: what a version changed and where its blobs are."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

BASE_VERSION = 0
DELTA, KEYFRAME, STATE = "delta", "keyframe", "state"


@dataclass(frozen=True)
class VersionInfo:
    id: int
    parent: int | None
    matrices: tuple[str, ...] = ()
    keyframes: tuple[str, ...] = ()
    state_full: bool = True
    blobs: Mapping[str, str] = field(default_factory=dict)  # kind -> sha256


def path_to(version: int, infos: Mapping[int, VersionInfo]) -> list[VersionInfo]:
    """The versions from the base (first) to ``version`` (last)."""
    path: list[VersionInfo] = []
    seen: set[int] = set()
    current: int | None = version
    while current is not None:
        if current in seen:
            raise ValueError(f"version tree: cycle through version {current}")
        seen.add(current)
        info = infos.get(current)
        if info is None:
            raise KeyError(f"version {current} does not exist")
        path.append(info)
        current = info.parent
    path.reverse()
    return path


def touched(path: Iterable[VersionInfo]) -> set[str]:
    return {name for info in path for name in info.matrices}


def needs_keyframe(path: list[VersionInfo], name: str, every: int) -> bool:
    """Whether a new version after ``path`` that changes ``name`` should store it in full.

    Counts the deltas to ``name`` since its last keyframe, the new one included, so that
    materialising any version adds at most ``every - 1`` deltas to a stored matrix.
    """
    count = 1
    for info in reversed(path):
        if name in info.keyframes:
            break
        if name in info.matrices:
            count += 1
    return count >= every


def needs_full_state(path: list[VersionInfo], every: int) -> bool:
    count = 1
    for info in reversed(path):
        if info.state_full:
            break
        count += 1
    return count >= every
