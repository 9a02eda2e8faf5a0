"""The annotation page in a real browser: headless Chromium (Debian's `chromium` package, driven
by Playwright's own driver -- no browser is downloaded; each launch gets a fresh profile) labels
items through the page in all three modes, with the keyboard and with the mouse, and the export
holds exactly what was shown and answered. Text that looks like HTML is shown as text and never
runs. Skipped, with the reason, where Playwright or Chromium is missing (`make setup` installs
both)."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from ppo_rlhf.data import PairwiseRecord, RankingRecord, RatingRecord, read_records
from tests.helpers import cli
from tests.test_annotate import start_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install 'ppo-rlhf[test]')")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; `make setup` "
                "does it)", allow_module_level=True)
expect = sync_api.expect
# Each page action waits on a round trip to the server, a separate process that commits every
# answer to SQLite (fsync). Playwright's default of 5 s was once too short in the full parallel
# suite (the error line of `test_lost_replies_...` still empty after 5 s: what a label request
# still in flight looks like; the test passed 9 of 9 runs alone and beside two busy loops): the
# waits allow 20 s. A step that never happens still fails, only later.
expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """open_page(url) -> a page in a fresh context (its own storage), loaded; JavaScript errors
    fail the test."""
    contexts, errors = [], []

    def open_(url: str):
        ctx = browser.new_context()
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    assert not errors, errors


@pytest.fixture
def server(tmp_path):
    """server(items, *args) -> (url, db): `ppo-rlhf annotate serve` on a responses file."""
    procs = []

    def start(items: dict[str, list[str]], *args):
        responses = tmp_path / "responses.jsonl"
        responses.write_text("".join(json.dumps({"prompt": p, "responses": r}) + "\n"
                                     for p, r in items.items()))
        db = tmp_path / "labels.sqlite"
        proc, port = start_server(["--responses", responses, "--db", db, *args])
        procs.append(proc)
        return f"http://127.0.0.1:{port}/", db

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def login(page, name: str) -> None:
    expect(page.locator("#name")).to_be_focused()
    page.keyboard.type(name)
    page.keyboard.press("Enter")
    expect(page.locator("#item")).to_be_visible()


def shown(page) -> tuple[str, list[str]]:
    return (page.locator("#prompt").text_content(),
            page.locator("#responses li .text").all_text_contents())


def export(db: Path, tmp: Path) -> list:
    out = tmp / "export.jsonl"
    cli("annotate", "export", "--db", db, "--out", out)
    return list(read_records(out))


HTML_PROMPT = "Say <b>hi</b> & <i>bye</i>"
HTML_RESPONSES = ["<img src=x onerror=\"document.title='pwned'\">hello",
                  "<script>document.title='pwned'</script>plain"]


def test_choose_mode_by_keyboard_and_by_mouse_then_export(server, open_page, tmp_path):
    items = {HTML_PROMPT: HTML_RESPONSES, "second prompt": ["s0", "s1"],
             "third prompt": ["t0", "t1"]}
    url, db = server(items, "--per-item", "2")
    answers = {}

    # ann: the keyboard only -- 2 + Enter, t + Enter, s
    page = open_page(url)
    login(page, "ann")
    expect(page.locator("#progress")).to_have_text("0 / 3 done")
    prompt, responses = shown(page)
    assert prompt == HTML_PROMPT and sorted(responses) == sorted(HTML_RESPONSES)  # literal text
    assert page.locator("#prompt b, #responses img, #responses script").count() == 0
    page.keyboard.press("Enter")  # nothing chosen yet: refused in the page, nothing sent
    expect(page.locator("#error")).to_contain_text("Choose the better response first")
    page.keyboard.press("2")
    expect(page.locator("#answer")).to_have_text("Your answer: response 2 is better")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("1 / 3 done")
    answers["ann", prompt] = ("chose", responses[1], responses[0])
    prompt, responses = shown(page)
    page.keyboard.press("t")
    expect(page.locator("#answer")).to_have_text("Your answer: a tie")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("2 / 3 done")
    answers["ann", prompt] = ("tie",)
    page.keyboard.press("s")
    expect(page.locator("#done")).to_be_visible()
    expect(page.locator("#done-text")).to_contain_text("All done, ann")
    assert page.title() == "ppo-rlhf annotate"  # no script from the data ever ran

    # bob: the mouse; a reload shows the same item (reserved) and remembers the name
    page = open_page(url)
    page.locator("#name").fill("bob")
    page.locator("#login-form button").click()
    expect(page.locator("#item")).to_be_visible()
    before = shown(page)
    page.reload()
    expect(page.locator("#item")).to_be_visible()
    expect(page.locator("#who")).to_have_text("bob")
    assert shown(page) == before
    for _ in range(3):
        prompt, responses = shown(page)
        done = page.locator("#progress").text_content()
        page.locator("#responses li").nth(0).click()
        page.locator("#submit").click()
        expect(page.locator("#progress")).not_to_have_text(done)
        answers["bob", prompt] = ("chose", responses[0], responses[1])
    expect(page.locator("#done")).to_be_visible()
    assert page.title() == "ppo-rlhf annotate"

    records = export(db, tmp_path)
    assert all(isinstance(r, PairwiseRecord) for r in records)
    got = {(r.extra["annotator"], r.prompt): ("tie",) if r.tie else ("chose", r.chosen, r.rejected)
           for r in records}
    assert got == answers and len(records) == 5  # ann skipped one
    s = json.loads(cli("annotate", "stats", "--db", db, "--json").stdout)
    assert (s["annotators"]["ann"]["answered"], s["annotators"]["ann"]["skipped"]) == (2, 1)
    assert s["annotators"]["bob"]["answered"] == 3 and s["agreement"]["pairs"] == 2


def test_rank_mode_by_keyboard_with_ties_and_undo(server, open_page, tmp_path):
    url, db = server({"rank these": ["r0", "r1", "r2"]}, "--mode", "rank", "--k", "3")
    page = open_page(url)
    login(page, "cy")
    prompt, responses = shown(page)
    for key in ("3", "2", "Backspace", "1", "=", "2"):
        page.keyboard.press(key)
    expect(page.locator("#answer")).to_have_text("Your ranking: 3 > 1 = 2")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_be_visible()
    [rec] = export(db, tmp_path)
    assert isinstance(rec, RankingRecord) and rec.extra["annotator"] == "cy"
    texts = [[rec.responses[i]] if isinstance(i, int) else sorted(rec.responses[j] for j in i)
             for i in rec.ranking]
    assert texts == [[responses[2]], sorted([responses[0], responses[1]])]


def test_rate_mode_by_keyboard_and_by_clicking_ratings(server, open_page, tmp_path):
    url, db = server({"rate a": ["a0", "a1"], "rate b": ["b0", "b1"]}, "--mode", "rate",
                     "--scale", "5")
    page = open_page(url)
    login(page, "dee")
    expected = {}
    prompt, responses = shown(page)
    for key in ("4", "1", "Backspace", "2"):
        page.keyboard.press(key)
    expect(page.locator("#answer")).to_have_text("Your ratings: 4, 2")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("1 / 2 done")
    expected.update({(prompt, responses[0]): 4.0, (prompt, responses[1]): 2.0})
    prompt, responses = shown(page)
    page.locator("#responses li").nth(1).locator(".ratings button", has_text="5").click()
    page.keyboard.press("Enter")  # one still unrated: refused
    expect(page.locator("#error")).to_contain_text("Rate every response first")
    page.locator("#responses li").nth(0).locator(".ratings button", has_text="3").click()
    page.locator("#submit").click()
    expect(page.locator("#done")).to_be_visible()
    expected.update({(prompt, responses[0]): 3.0, (prompt, responses[1]): 5.0})
    records = export(db, tmp_path)
    assert all(isinstance(r, RatingRecord) for r in records)
    assert {(r.prompt, r.response): r.rating for r in records} == expected


def test_lost_replies_neither_lose_nor_repeat_an_answer(server, open_page, tmp_path):
    """The page's answer fails twice: once before it reaches the server (the answer stays on
    screen and is sent again), once after the server stored it (the page sees the server
    hand out the next item and goes on). Each answer is stored exactly once."""
    url, db = server({"first": ["f0", "f1"], "second": ["s0", "s1"], "third": ["t0", "t1"]})
    page = open_page(url)
    login(page, "eve")
    page.route("**/api/label", lambda route: route.abort("connectionreset"))
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_contain_text("the server cannot be reached")
    expect(page.locator("#answer")).to_have_text("Your answer: response 1 is better")
    page.unroute("**/api/label")
    page.keyboard.press("Enter")  # sent again: stored now
    expect(page.locator("#progress")).to_have_text("1 / 3 done")

    def store_then_drop_the_reply(route):
        route.fetch()  # the server commits the answer ...
        route.abort("connectionreset")  # ... and the page never hears back

    page.route("**/api/label", store_then_drop_the_reply)
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_have_text(
        "Your answer to the previous item had already been saved.")
    expect(page.locator("#progress")).to_have_text("2 / 3 done")
    page.unroute("**/api/label")
    page.keyboard.press("t")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_be_visible()
    records = export(db, tmp_path)
    assert sorted(r.prompt for r in records) == ["first", "second", "third"]


def test_undo_brings_back_a_skip_and_an_answer_and_skips_are_not_counted(server, open_page, tmp_path):
    url, db = server({"first": ["f0", "f1"], "second": ["s0", "s1"]})
    page = open_page(url)
    expect(page.locator("#login .hint")).to_contain_text("case-sensitive")
    login(page, "fay")
    first, _ = shown(page)
    page.keyboard.press("s")  # skip by mistake ...
    expect(page.locator("#undo-text")).to_have_text("Item skipped.")
    expect(page.locator("#prompt")).not_to_have_text(first)  # the next item has come
    second, _ = shown(page)
    page.keyboard.press("u")  # ... and take it back: the skipped item comes again
    expect(page.locator("#prompt")).to_have_text(first)
    expect(page.locator("#undo-bar")).to_be_hidden()
    expect(page.locator("#progress")).to_have_text("0 / 2 done")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("1 / 2 done")
    page.keyboard.press("s")  # the last item skipped: the done page counts it as skipped
    expect(page.locator("#done-text")).to_contain_text("you have answered 1 item(s) and skipped 1")
    page.locator("#undo").click()  # undo from the done page
    expect(page.locator("#item")).to_be_visible()
    expect(page.locator("#prompt")).to_have_text(second)
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    expect(page.locator("#done-text")).to_contain_text("you have answered 2 item(s).")
    page.keyboard.press("u")  # an answer can be undone too: it is asked again
    expect(page.locator("#item")).to_be_visible()
    expect(page.locator("#prompt")).to_have_text(second)
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_be_visible()
    records = export(db, tmp_path)
    assert sorted(r.prompt for r in records) == ["first", "second"]  # each once, no skip kept


def test_opening_the_page_without_the_token_says_what_to_do(server, open_page):
    url, _ = server({"first": ["f0", "f1"]}, "--token", "t0ken-for-the-browser-test")
    page = open_page(url)
    expect(page.locator("h1")).to_have_text("This annotation server needs its token")
    expect(page.locator("body")).to_contain_text("/?token=")
    page = open_page(url + "?token=t0ken-for-the-browser-test")
    login(page, "gil")
