"""The chat page (web/) in a real Chromium (Debian's, driven by Playwright) against server.py on the tiny
checkpoint: what it shows equals chat.py's reply and /experts FILE, its transcripts go both ways with
chat.py, it asks for a key, hostile replies run nothing, and every page ends with no console error
and no CSP violation. Without Chromium these tests fail, they never skip: README says how to install it."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import KEY, ROOT, Server, run_script

WEB = ROOT / "web"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As root, in a closed network: no sandbox, and none of Chromium's own connections out.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WAIT_MS = 30_000  # every wait on the page is bounded
MESSAGE = "Hello Menny, **who** are you?"
SECOND = "And why?"
MAX_TOKENS = 24
# Every violation of the page's Content-Security-Policy becomes a console error the tests see.
REPORT_CSP = """document.addEventListener("securitypolicyviolation",
  (e) => console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));"""


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file(), (
        f"no Chromium at {CHROMIUM}: bash tests/run.sh installs it (or apt-get install -y --no-install-recommends chromium)"
    )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=WAIT_MS)
        yield b
        b.close()


@contextlib.contextmanager
def open_page(browser, url, expected=(), **context_options):
    """A fresh browser profile on the page; on leaving, no console error, page error or CSP violation
    but those holding one of the `expected` strings."""
    options = {"viewport": {"width": 1280, "height": 900}, "accept_downloads": True, **context_options}
    context = browser.new_context(**options)
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(REPORT_CSP)
    page = context.new_page()
    problems, requests = [], []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.requests = requests
    page.goto(url)
    try:
        yield page
    finally:
        context.close()
    assert not [p for p in problems if not any(e in p for e in expected)], problems


def ready(page):
    """The page has the server's props (and so its defaults)."""
    expect(page.locator("#model")).not_to_be_empty()


def set_sampling(page, **values):
    if page.locator("#settings").get_attribute("open") is None:
        page.click("#settings summary")
    for name, value in values.items():
        page.fill(f"#{name}", str(value))
        page.dispatch_event(f"#{name}", "change")


def say(page, text):
    """Send text as the user (Enter) and wait for the whole reply; -> its plain text (the raw view)."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    expect(page.locator("#stop")).to_be_hidden()
    reply = page.locator(".message.assistant").last
    return reply.locator("pre.raw").text_content()


def numbers(page, part):
    """The expert map's numbers view of one part: per layer, the count per expert."""
    rows = page.locator(f"#numbers-{part} tbody tr")
    return [[int(c) for c in rows.nth(i).locator("td").all_text_contents()] for i in range(rows.count())]


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="module")
def server(mlx_q8, cache_home):
    s = Server(mlx_q8, "--max-context", 2048, key=None, env={**os.environ, "XDG_CACHE_HOME": str(cache_home)})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page_url(server):
    return server.url.removesuffix("v1")


@pytest.fixture(scope="module")
def exchange(browser, page_url, tmp_path_factory):
    """Two exchanges in the page at temperature 0 with Menny's persona, the first exported in between:
    -> what it showed, the expert map's numbers, and the exported transcript."""
    out = tmp_path_factory.mktemp("exchange")
    with open_page(browser, page_url) as page:
        ready(page)
        set_sampling(page, temperature=0, max_tokens=MAX_TOKENS)
        first = say(page, MESSAGE)
        shown = {part: numbers(page, part) for part in ("prompt", "reply")}
        page.screenshot(path=out / "page.png", full_page=True)
        if target := os.environ.get("MIXTRAL_SCREENSHOT"):  # README's picture: MIXTRAL_SCREENSHOT=docs/webui.png
            shutil.copy(out / "page.png", target)
        with page.expect_download() as download:
            page.click("#export")
        download.value.save_as(out / "export.json")
        second = say(page, SECOND)
        stats = page.locator(".message.assistant .stats").all_inner_texts()
    return {"first": first, "numbers": shown, "export": out / "export.json", "second": second, "stats": stats}


@pytest.fixture(scope="module")
def chat_py(mlx_q8, tmp_path_factory):
    """chat.py in the terminal, as the page was used: the reply, /experts FILE and /save FILE."""
    out = tmp_path_factory.mktemp("chat")
    r = run_script(
        "chat.py",
        *("--model-path", mlx_q8, "--temp", 0, "--max-tokens", MAX_TOKENS),
        stdin=f"{MESSAGE}\n/experts {out / 'experts.json'}\n/save {out / 'saved.json'}\n",
    )
    assert r.returncode == 0, r.stderr
    return {"reply": r.stdout.removesuffix("\n"), "experts": out / "experts.json", "saved": out / "saved.json"}


# --------------------------------------------------------------------------- the files, over plain HTTP


def test_vendored_files_match_their_manifest():
    manifest = json.loads((WEB / "vendor" / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"marked.esm.js", "purify.es.mjs"}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((WEB / "vendor" / name).read_bytes()).hexdigest() == entry["sha256"], name
        assert entry["version"] and entry["license"] and entry["tarball"].startswith("https://registry.npmjs.org/")


def test_the_page_loads_nothing_from_elsewhere_and_has_no_inline_code():
    html = (WEB / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+\s*=", html)
    assert "http://" not in html and "https://" not in html


def test_the_page_needs_no_key_and_every_answer_carries_the_security_headers(mlx_q8):
    s = Server(mlx_q8, "--max-context", 256)  # with --api-key
    try:
        types = {
            "/": "text/html",
            "/app.js": "javascript",
            "/style.css": "text/css",
            "/vendor/marked.esm.js": "javascript",
            "/vendor/purify.es.mjs": "javascript",
        }
        for path, kind in types.items():
            r = s.http.get(path)
            assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.status_code, r.headers)
        assert s.http.get("/v1/props").status_code == 401  # /v1 keeps its key
        props = s.http.get("/v1/props", headers={"Authorization": f"Bearer {KEY}"})
        assert props.status_code == 200 and props.json()["max_context"] == 256
        for r in (s.http.get("/"), s.http.get("/app.js"), props, s.http.get("/v1/props")):
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
    finally:
        s.stop()


def test_no_webui_serves_only_the_api(mlx_q8):
    s = Server(mlx_q8, "--max-context", 256, "--no-webui", key=None)
    try:
        assert s.http.get("/").status_code == 404 and s.http.get("/app.js").status_code == 404
        assert s.http.get("/v1/props").status_code == 200
    finally:
        s.stop()


# --------------------------------------------------------------------------- in the browser


def test_a_reply_streams_and_stop_cancels_it(browser, page_url, server):
    with open_page(browser, page_url) as page:
        ready(page)
        set_sampling(page, temperature=0.7, max_tokens=1900)
        page.fill("#input", "Tell me everything.")
        page.click("#send")
        reply = page.locator(".message.assistant .raw").last
        expect(reply).not_to_be_empty()
        before = len(reply.text_content())
        deadline = time.monotonic() + 30  # (no wait_for_function: the page's CSP refuses eval)
        while len(reply.text_content()) <= before:
            assert time.monotonic() < deadline, "the reply did not grow"
            time.sleep(0.01)
        expect(page.locator("#stop")).to_be_visible()  # still streaming: more came, and it is not over
        page.click("#stop")
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#status")).to_have_text("stopped")
        stopped = reply.text_content()
        assert stopped and len(stopped) < 1900 * 8
        time.sleep(0.5)
        assert reply.text_content() == stopped  # nothing more arrives
        # The server let go: it answers the next request at once, not after the ~1900 tokens (4+ s here).
        tic = time.monotonic()
        r = server.http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        )
        assert r.status_code == 200 and time.monotonic() - tic < 2.5


def test_at_temperature_0_the_page_shows_chat_py_reply(exchange, chat_py):
    assert exchange["first"] == chat_py["reply"]


def test_the_expert_map_equals_chat_py_experts_file(exchange, chat_py):
    report = json.loads(chat_py["experts"].read_text())
    for part in ("prompt", "reply"):
        assert exchange["numbers"][part] == [layer[part] for layer in report["layers"]], part


def test_each_reply_shows_its_speed_first_token_cache_reuse_and_context(exchange):
    first, second = (" ".join(text.split()) for text in exchange["stats"])
    for stats in (first, second):
        assert re.search(r"\d+\.\d tokens/s .*first token \d+\.\d\d s", stats), stats
        assert re.search(rf"{MAX_TOKENS} tokens context \d+/2048", stats), stats
    prompt, reused = map(int, re.search(r"prompt (\d+): (\d+) reused", first).groups())
    assert reused == 0 and f"{prompt - reused} prefilled" in first
    # The second request resends the first exchange: the server's cache holds it, only the rest is new.
    prompt, reused = map(int, re.search(r"prompt (\d+): (\d+) reused", second).groups())
    assert reused > 30 and prompt - reused < 16, second


def test_regenerate_and_edit_last(browser, page_url):
    with open_page(browser, page_url) as page:
        ready(page)
        set_sampling(page, temperature=0, max_tokens=6)
        reply = say(page, "Say it twice")
        page.click("#regen")
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator(".message")).to_have_count(2)
        expect(page.locator(".message.assistant .raw")).to_have_text(reply)  # temperature 0: the same again
        page.click("#edit")
        expect(page.locator(".message")).to_have_count(0)
        expect(page.locator("#input")).to_have_value("Say it twice")


def test_no_persona_sends_plain_mixtral_instruct(browser, page_url, mlx_q8):
    with open_page(browser, page_url) as page:
        ready(page)
        set_sampling(page, temperature=0, max_tokens=MAX_TOKENS)
        page.click("#persona-card summary")
        page.check("#no-persona")
        page.click("#apply-persona")
        expect(page.locator("#persona-summary")).to_contain_text("none")
        shown = say(page, MESSAGE)
    r = run_script(
        "chat.py",
        *("--model-path", mlx_q8, "--temp", 0, "--max-tokens", MAX_TOKENS, "--system-prompt", ""),
        *("--prompt", MESSAGE),
    )
    assert r.returncode == 0, r.stderr
    assert shown == r.stdout.removesuffix("\n")


def test_an_exported_chat_continues_in_chat_py(exchange, mlx_q8):
    saved = json.loads(exchange["export"].read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    assert saved["messages"][2]["content"] == exchange["first"] and saved["messages"][2]["tokens"]
    r = run_script(
        "chat.py",
        *("--model-path", mlx_q8, "--temp", 0, "--max-tokens", MAX_TOKENS),
        *("--resume", exchange["export"], "--prompt", SECOND),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.removesuffix("\n") == exchange["second"]


def test_a_transcript_saved_by_chat_py_opens_in_the_page(browser, page_url, chat_py):
    saved = json.loads(chat_py["saved"].read_text())
    with open_page(browser, page_url) as page:
        ready(page)
        page.set_input_files("#import", chat_py["saved"])
        expect(page.locator(".message")).to_have_count(2)
        assert page.locator(".message .raw").all_text_contents() == [m["content"] for m in saved["messages"][1:]]
        assert page.locator("#persona").input_value() == saved["messages"][0]["content"]


def test_saved_sessions_are_listed_and_open(browser, page_url, mlx_q8, cache_home):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    r = run_script(
        "chat.py", "--model-path", mlx_q8, "--session", "homework", "--prompt", "Hi", "--max-tokens", 5, env=env
    )
    assert r.returncode == 0, r.stderr
    talk = json.loads((cache_home / "mixtral-mlx" / "sessions" / "homework" / "talk.json").read_text())
    with open_page(browser, page_url) as page:
        ready(page)
        page.get_by_role("button", name="homework (1 turns)").click()
        expect(page.locator(".message")).to_have_count(2)
        assert page.locator(".message .raw").all_text_contents() == [m["content"] for m in talk["messages"][1:]]


def test_a_server_with_a_key_asks_for_it_and_keeps_it_out_of_urls(browser, mlx_q8):
    s = Server(mlx_q8, "--max-context", 256)
    try:
        # Chrome logs each 401 as an error: the page's first request is meant to get one.
        with open_page(browser, s.url.removesuffix("v1"), expected=["status of 401"]) as page:
            expect(page.locator("#key-dialog")).to_be_visible()
            page.fill("#key", KEY)
            page.click("#key-ok")
            ready(page)
            set_sampling(page, max_tokens=4)
            assert say(page, "Hi")
            assert page.evaluate("sessionStorage.getItem('menny.key')") == KEY
            assert page.evaluate("localStorage.getItem('menny.key')") is None  # "remember" was not ticked
            assert not [u for u in page.requests if KEY in u]
    finally:
        s.stop()


HOSTILE = (
    'Hi <script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> '
    "[click me](javascript:window.pwned=3) ![pic](http://127.0.0.1:9/tracker.png) "
    '<iframe src="http://127.0.0.1:9/frame"></iframe> [docs](https://example.com/docs)'
)


def test_hostile_replies_run_nothing_load_nothing_and_show_as_text(browser, page_url):
    def stream(route):
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": HOSTILE[i : i + 7]}}]} for i in range(0, len(HOSTILE), 7)
        ]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    with open_page(browser, page_url) as page:
        ready(page)
        page.route("**/v1/chat/completions", stream)
        say(page, "be nasty")
        shown = page.locator(".message.assistant .body").last
        assert shown.locator("script, img, iframe").count() == 0
        assert "<script>window.pwned = 1</script>" in shown.inner_text()
        assert "<iframe" in shown.inner_text()
        links = shown.locator("a")
        hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
        assert hrefs == ["http://127.0.0.1:9/tracker.png", "https://example.com/docs"]  # the image became a link
        assert all(links.nth(i).get_attribute("rel") == "noopener noreferrer" for i in range(links.count()))
        shown.get_by_text("click me").click()  # the javascript: link is plain text
        assert page.evaluate("window.pwned") is None
        assert not [u for u in page.requests if "127.0.0.1:9" in u]  # nothing was loaded


def test_history_stays_readable_when_the_server_is_down(browser, mlx_q8):
    s = Server(mlx_q8, "--max-context", 256, key=None)
    with open_page(browser, s.url.removesuffix("v1"), expected=["ERR_CONNECTION_REFUSED"]) as page:
        ready(page)
        set_sampling(page, max_tokens=4)
        first = say(page, "Remember me")
        page.click("#new-chat")
        expect(page.locator(".message")).to_have_count(0)
        s.stop()
        page.get_by_role("button", name="Remember me").click()
        expect(page.locator(".message .raw").last).to_have_text(first)
        page.fill("#input", "Still there?")
        page.click("#send")
        expect(page.locator("#status")).to_contain_text("error")
        expect(page.locator("#input")).to_have_value("Still there?")  # the unsent message is not lost


def test_dark_mode_and_a_phone_width_screen(browser, page_url):
    with open_page(browser, page_url, color_scheme="dark", viewport={"width": 390, "height": 844}) as page:
        ready(page)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert sum(int(x) for x in background[4:-1].split(",")[:3]) < 3 * 60, background
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
        expect(page.locator("#input")).to_be_visible()
