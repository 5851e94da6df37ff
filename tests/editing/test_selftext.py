"""The text the model samples itself for its key statistics: how it is laid out in rows."""

from __future__ import annotations

import pytest

from workers.editing import selftext
from workers.editing.model import LoadedModel


@pytest.mark.parametrize(
    ("max_tokens", "layout"),
    [(4096, (1, 256)), (1000, (1, 62)), (16384, (4, 256)), (20000, (5, 250)), (16, (1, 1))],
)
def test_rows_stay_short_however_much_text_is_asked_for(
    max_tokens: int, layout: tuple[int, int]
) -> None:
    rows, per_row = selftext._layout(max_tokens)
    assert (rows, per_row) == layout
    assert per_row <= selftext.MAX_ROW
    assert rows * per_row * len(selftext.OPENINGS) <= max_tokens


def test_more_text_comes_as_more_rows_of_every_opening(
    loaded_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selftext, "MAX_ROW", 3)
    tok = loaded_model.tokenizer
    max_tokens = 2 * 3 * len(selftext.OPENINGS)  # two rows of three sampled tokens per opening
    chunks = selftext.self_text_chunks(loaded_model.model, tok, max_tokens)
    openings = selftext._openings(tok)
    assert len(chunks) == 2 * len(openings)
    assert sum(len(c) for c in chunks) == selftext.self_text_length(tok, max_tokens)
    for i, chunk in enumerate(chunks):
        opening = openings[i % len(openings)]
        assert chunk[: len(opening)] == opening and len(chunk) == len(opening) + 3
    # the second row of an opening is sampled on its own, not a copy of the first
    assert any(chunks[i] != chunks[i + len(openings)] for i in range(len(openings)))
