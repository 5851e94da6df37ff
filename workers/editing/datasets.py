"""Benchmark records (CounterFact, zsRE) in one shape: the edit to make plus its held-out probes.

Only the edit prompt goes into the ``EditRequest``: the rephrase and locality prompts are what the
evaluation measures, so an editor must never see them as training observations.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from workers.editing.requests import EditRequest

log = logging.getLogger(__name__)

Dataset = Literal["counterfact", "zsre"]
DATASETS: tuple[str, ...] = ("counterfact", "zsre")


@dataclass(frozen=True)
class EvalRecord:
    case_id: str
    request: EditRequest
    ground_truth: str
    rephrase_prompt: str
    locality_prompt: str
    locality_ground_truth: str

    @property
    def prompt(self) -> str:
        return self.request.text

    @property
    def target_new(self) -> str:
        return self.request.target_new


class RecordList(list[EvalRecord]):
    """The records kept; ``skipped`` counts, by reason, those of the window that were dropped."""

    def __init__(self, records: Iterable[EvalRecord] = ()) -> None:
        super().__init__(records)
        self.skipped: Counter[str] = Counter()


def _counterfact(raw: Mapping[str, Any], index: int) -> tuple[dict[str, Any], str]:
    return (
        {
            "prompt": raw["prompt"],
            "subject": raw["subject"],
            "target_new": raw["target_new"],
            "ground_truth": raw["ground_truth"],
            "rephrase_prompt": raw["rephrase_prompt"],
            "locality_prompt": raw["locality_prompt"],
            "locality_ground_truth": raw["locality_ground_truth"],
        },
        str(raw.get("case_id", index)),
    )


def _zsre(raw: Mapping[str, Any], index: int) -> tuple[dict[str, Any], str]:
    answers = raw["answers"]
    truth = answers[0] if isinstance(answers, list) and answers else answers
    return (
        {
            "prompt": raw["src"],
            "subject": raw["subject"],
            "target_new": raw["alt"],
            "ground_truth": truth,
            "rephrase_prompt": raw["rephrase"],
            "locality_prompt": raw["loc"],
            "locality_ground_truth": raw["loc_ans"],
        },
        str(raw.get("case_id", index)),
    )


_MAPPERS = {"counterfact": _counterfact, "zsre": _zsre}


def _skip_reason(fields: Mapping[str, Any]) -> str | None:
    if not all(isinstance(v, str) and v.strip() for v in fields.values()):
        return "missing_or_empty_field"
    if fields["subject"] not in fields["prompt"]:
        return "subject_not_in_prompt"
    if fields["target_new"].strip() == fields["ground_truth"].strip():
        return "target_equals_truth"
    return None


def load_records(
    path: str | os.PathLike[str],
    dataset: Dataset | str = "counterfact",
    offset: int = 0,
    n: int | None = None,
) -> RecordList:
    """Records ``offset .. offset+n`` of the file (positions in the file, before skipping).

    Records that cannot be an edit (subject absent from the prompt, target equal to the truth,
    an empty field) are dropped and counted in ``skipped`` by reason.
    """
    if dataset not in _MAPPERS:
        raise ValueError(f"dataset: must be one of {DATASETS}, got {dataset!r}")
    if offset < 0 or (n is not None and n < 0):
        raise ValueError("offset and n must not be negative")
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    window = raw[offset:] if n is None else raw[offset : offset + n]
    out = RecordList()
    for index, item in enumerate(window, start=offset):
        try:
            fields, case_id = _MAPPERS[dataset](item, index)
        except (KeyError, TypeError):
            out.skipped["missing_or_empty_field"] += 1
            continue
        reason = _skip_reason(fields)
        if reason is None:
            try:
                request = EditRequest(
                    prompt=fields["prompt"],
                    subject=fields["subject"],
                    target_new=fields["target_new"],
                    ground_truth=fields["ground_truth"],
                )
            except ValueError:
                reason = "invalid_request"
        if reason is not None:
            out.skipped[reason] += 1
            continue
        out.append(
            EvalRecord(
                case_id=case_id,
                request=request,
                ground_truth=fields["ground_truth"],
                rephrase_prompt=fields["rephrase_prompt"],
                locality_prompt=fields["locality_prompt"],
                locality_ground_truth=fields["locality_ground_truth"],
            )
        )
    if out.skipped:
        total = sum(out.skipped.values())
        log.warning("%s: skipped %d of %d records: %s", path, total, len(window), dict(out.skipped))
    return out
