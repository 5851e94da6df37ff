"""docs/loki-log.md opens with a list of its paragraph titles, and code comments cite those
paragraphs by title (`loki-log.md, "<title>"`). Both are kept by hand, so they are checked here
against the bold titles the paragraphs actually open with."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "docs" / "loki-log.md"
# a citation may wrap across comment lines: `# ... (loki-log.md, "The model's own` / `# articles")`
CITATION = re.compile(r'loki-log\.md, "([^"]+)"')
WRAPPED_COMMENT = re.compile(r"\s*\n\s*#\s*")


def paragraph_titles(text: str) -> list[str]:
    """The bold opening of each paragraph that has one, unescaped, without its full stop."""
    titles = []
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.startswith("**"):
            continue
        flat = " ".join(paragraph.split())
        match = re.match(r"\*\*((?:\\\*|[^*])+)\*\*", flat)
        assert match, f"unclosed bold title: {flat[:80]}"
        titles.append(match.group(1).replace("\\*", "*").rstrip("."))
    return titles


def listed_titles(text: str) -> list[str]:
    """The entries of the list under 'Paragraphs, in order:'."""
    after = text.split("Paragraphs, in order:", 1)[1].lstrip("\n")
    entries = []
    for line in after.splitlines():
        if not line.startswith("- "):
            break
        entries.append(line[2:].strip())
    return entries


def cited_titles() -> list[tuple[str, str]]:
    found = []
    for path in [*ROOT.glob("workers/**/*.py"), *ROOT.glob("bench/**/*.py"), ROOT / "README.md"]:
        text = WRAPPED_COMMENT.sub(" ", path.read_text())
        found += [
            (str(path.relative_to(ROOT)), " ".join(title.split()))
            for title in CITATION.findall(text)
        ]
    return found


def test_parser_reads_wrapped_and_escaped_titles() -> None:
    text = "intro\n\n**A title on\ntwo lines with v\\* (note).** Body **bold** here.\n\nplain\n"
    assert paragraph_titles(text) == ["A title on two lines with v* (note)"]


def test_the_index_lists_every_paragraph_title_in_order() -> None:
    text = LOG.read_text()
    titles = paragraph_titles(text)
    assert len(titles) > 30
    assert listed_titles(text) == titles


def test_every_citation_names_a_paragraph() -> None:
    titles = paragraph_titles(LOG.read_text())
    citations = cited_titles()
    assert citations, "no citations found: has the citation form changed?"
    unknown = [
        (path, cited)
        for path, cited in citations
        if not any(title.startswith(cited) for title in titles)
    ]
    assert not unknown, f"citations of no paragraph title in docs/loki-log.md: {unknown}"
