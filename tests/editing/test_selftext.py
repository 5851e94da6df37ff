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


def test_articles_keep_only_what_the_model_wrote(loaded_model: LoadedModel) -> None:
    tok = loaded_model.tokenizer
    max_tokens = 2 * len(selftext.ARTICLE_TOPICS)  # two sampled tokens per article
    chunks = selftext.self_text_chunks(loaded_model.model, tok, max_tokens, style="articles")
    assert len(chunks) == len(selftext.ARTICLE_TOPICS) == len(selftext.OPENINGS)
    assert all(len(c) == 2 for c in chunks)  # the chat request and its template are left out
    assert sum(map(len, chunks)) == selftext.self_text_length(tok, max_tokens, "articles")
    assert selftext.self_text_id(style="articles") != selftext.self_text_id()
    assert selftext._layout(max_tokens, 16) == (1, 2)
    # the openings' id is the one their cached statistics were filed under before articles
    assert selftext.self_text_id() == "9ad089f5af9bc111"


def test_a_model_without_a_chat_template_samples_the_openings(
    loaded_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tok = loaded_model.tokenizer
    assert selftext.resolve_style(tok, "articles") == "articles"
    monkeypatch.setattr(tok, "chat_template", None)
    with caplog.at_level("WARNING", logger="workers.editing.selftext"):
        style = selftext.resolve_style(tok, "articles")
    assert style == "openings" and "no chat template" in caplog.text
    assert selftext.resolve_style(tok, "openings") == "openings"


def test_an_unknown_style_is_refused(loaded_model: LoadedModel) -> None:
    for refuse in (
        lambda: selftext.resolve_style(loaded_model.tokenizer, "wiki"),
        lambda: selftext.self_text_length(loaded_model.tokenizer, 64, "wiki"),
        lambda: selftext.self_text_id(style="wiki"),
    ):
        with pytest.raises(ValueError, match="self_text_style"):
            refuse()
