"""The operator's walk through /admin in real headless Chromium (Debian's, never a download):
log in, submit an edit from the form and watch it go queued → applied without a reload, open
its detail, compare versions in the playground, roll back from the versions page (with the
confirmation step) and see the playground's answer change. Screenshots of every page go to
test-artifacts/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from app.services import keys
from tests.service.conftest import GUARDED, RANK_ONE, ROOT, Server, counterfact, start_server
from workers.editing.model import LoadedModel

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
RECORD = counterfact()[50]  # Hedwig Bollhagen works in pottery → a rank-one edit the guard passes
# Status badges seen under the submitted edit, recorded in the page itself: a reload would
# lose both this list and the marker, so together they prove the page was never reloaded.
WATCH_STATUSES = """() => {
  window.__marker = "same page";
  window.__seen = [];
  const note = () => document.querySelectorAll("#submit-result .status").forEach(el => {
    const s = el.dataset.status;
    if (window.__seen[window.__seen.length - 1] !== s) window.__seen.push(s);
  });
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true,
                                                     attributes: true});
}"""


@pytest.fixture(scope="module")
def dashboard(
    tmp_path_factory: pytest.TempPathFactory, models: tuple[LoadedModel, LoadedModel]
) -> Iterator[tuple[Server, str]]:
    tmp = tmp_path_factory.mktemp("dashboard")
    server, stop = start_server(tmp, models, editor=RANK_ONE, heartbeat_interval=0.5, **GUARDED)
    with server.runtime.infra.factory() as session:
        raw = keys.create_key(session, "operator", ["admin"])[1]
    yield server, raw
    stop()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def ask_playground(page: Page, url: str, version: int) -> tuple[str, str]:
    page.goto(f"{url}/admin/playground")
    page.fill("#pg-prompt", RECORD["prompt"])
    page.select_option("#pg-version", str(version))
    page.fill("#pg-tokens", "6")
    page.click("#playground-form button[type=submit]")
    expect(page.locator("#answer-other")).to_have_attribute("data-version", str(version))
    head = page.locator("#answer-head .completion").inner_text()
    other = page.locator("#answer-other .completion").inner_text()
    return head, other


def test_operator_walk_in_chromium(dashboard: tuple[Server, str]) -> None:
    server, raw = dashboard
    url = server.url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{url}/admin")
            expect(page).to_have_url(re.compile(r"/admin/login\?next=/admin$"))
            shot(page, "login")
            page.fill("#key", "lokid_wrong")
            page.click("button[type=submit]")
            expect(page.locator("#login-error")).to_contain_text("not recognised")
            page.fill("#key", raw)
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{url}/admin")
            expect(page.locator("#ov-head")).to_have_text("v0")
            expect(page.locator("#ov-worker")).to_have_text("idle")

            # submit from the form; the status under it changes in place
            page.goto(f"{url}/admin/edits")
            page.evaluate(WATCH_STATUSES)
            page.fill("#prompt", RECORD["prompt"])
            page.fill("#subject", RECORD["subject"])
            page.fill("#target_new", RECORD["target_new"])
            page.fill("#ground_truth", RECORD["ground_truth"])
            page.click("#edit-form button[type=submit]")
            status = page.locator("#submit-result .status")
            expect(status).to_have_attribute("data-status", "applied", timeout=180_000)
            seen = page.evaluate("window.__seen")
            assert seen[0] == "queued" and seen[-1] == "applied", seen
            assert page.evaluate("window.__marker") == "same page"
            expect(page.locator("#edit-rows")).to_contain_text("applied")  # the log polls too
            shot(page, "edits")

            page.locator("#submit-result a").first.click()
            expect(page).to_have_url(re.compile(r"/admin/edits/\d+$"))
            expect(page.locator("#detail-status")).to_have_text("applied")
            expect(page.locator("#layers")).to_contain_text("4")
            expect(page.locator("#delta-norms")).to_contain_text("layers.4.mlp.down_proj")
            after = page.locator("#probe .probe-after .generation").inner_text()
            assert after.strip().startswith(RECORD["target_new"]), after
            shot(page, "edit-detail")

            head_answer, v0_answer = ask_playground(page, url, 0)
            assert head_answer.strip().startswith(RECORD["target_new"]), head_answer
            assert not v0_answer.strip().startswith(RECORD["target_new"]), v0_answer
            shot(page, "playground")

            page.goto(f"{url}/admin")
            expect(page.locator("#ov-head")).to_have_text("v1")
            shot(page, "overview")

            page.goto(f"{url}/admin/health")
            expect(page.locator("#health-svg circle.point")).to_have_count(4)  # 2 panels × v0, v1
            shot(page, "health")

            page.goto(f"{url}/admin/versions")
            expect(page.locator("#v1 #head-mark")).to_be_visible()
            page.select_option("#diff-a", "0")
            page.select_option("#diff-b", "1")
            page.click("#diff-form button[type=submit]")
            expect(page.locator("#diff-matrices")).to_contain_text("layers.4.mlp.down_proj")
            shot(page, "versions")
            page.click("#rollback-0")
            expect(page.locator("h1")).to_have_text("Roll back to v0?")
            shot(page, "rollback-confirm")
            page.click("#confirm-rollback")
            expect(page.locator("#flash")).to_contain_text("v0 is the head")
            expect(page.locator("#head")).to_have_text("v0")

            head_now, _ = ask_playground(page, url, 1)
            assert head_now == v0_answer, (head_now, v0_answer)
            expect(page.locator("#answer-head")).to_have_attribute("data-version", "0")
        finally:
            shot(page, "last")
            browser.close()
