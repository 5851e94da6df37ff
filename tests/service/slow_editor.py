"""The rank-one test editor, slowed down so a test can act while an edit is in progress."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from tests.service.rank_one import RankOneEditor
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult


class SlowRankOneEditor(RankOneEditor):
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        time.sleep(float(os.environ.get("LOKID_TEST_EDIT_SECONDS", "3")))
        return super().compute(requests)
