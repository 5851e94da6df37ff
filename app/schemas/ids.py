"""Bounds shared by every id in a path, query or body: ids are 64-bit in Postgres, so a larger
number is refused as bad input (422) instead of overflowing in the database (500)."""

from __future__ import annotations

MAX_ID = 2**63 - 1
