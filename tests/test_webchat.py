"""The web chat (nanoseek/serving/static/index.html) end to end in a real headless Chromium, driven by Playwright.

The server runs the scripted checkpoint of test_server.py (greedy output = a fixed reasoning, </think>, a fixed
answer), with HTML/JS payloads added to the vocabulary as whole tokens, so the model itself writes
`<script>...</script>` into its reasoning and `<img onerror=...>` into its answer. The page must show them as text.
Needs Debian's `chromium` package (Playwright drives it; its own browser download is never used).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from test_server import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    SCRIPT_ANSWER,
    SCRIPT_REASONING,
    make_scripted_model,
    metric,
    one_torch_thread,
    serving,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCRIPT_PAYLOAD = "<script>window.__xss=1</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__xss=2">'
REASONING = f"{SCRIPT_REASONING}{SCRIPT_PAYLOAD}"
ANSWER = f"{SCRIPT_ANSWER}{IMG_PAYLOAD}"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="headless browser test needs Debian's chromium (apt-get install chromium)")

# Records, in order, which block ("r" reasoning / "a" answer) changed, to check streaming and ordering.
OBSERVER = """() => {
  window.__changes = [];
  new MutationObserver((records) => {
    for (const rec of records) {
      const node = rec.target.nodeType === 1 ? rec.target : rec.target.parentElement;
      if (node.closest('.reasoning')) window.__changes.push('r');
      else if (node.closest('.answer')) window.__changes.push('a');
    }
  }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
}"""


def wait_for(page, js: str, arg=None, timeout: float = 15.0) -> None:
    """Poll a JS function until it returns true. (Playwright's wait_for_function evaluates its predicate with eval,
    which the page's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js, arg):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_scripted_model(tmp_path_factory.mktemp("webchat"), REASONING, ANSWER,
                                extra_tokens=(SCRIPT_PAYLOAD, IMG_PAYLOAD))
    with serving(model, max_batch_size=2) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


def test_chat_streams_thinking_then_answer_as_text(server, browser):
    url, _ = server
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    wait_for(page, "() => document.getElementById('model').textContent.startsWith('tiny')")
    page.evaluate(OBSERVER)

    page.fill("#input", "What colour is the sky?")
    page.press("#input", "Enter")
    wait_for(page, "(t) => { const a = document.querySelector('.answer'); return a && a.textContent === t; }", ANSWER)
    assert page.text_content(".msg.user") == "What colour is the sky?"
    assert page.text_content(".reasoning") == REASONING  # the script tag is literal text
    assert page.text_content(".answer") == ANSWER
    # nothing the model wrote became markup, and nothing ran
    assert page.evaluate("() => document.querySelectorAll('#log script, #log img').length") == 0
    assert page.evaluate("() => window.__xss") is None
    # streamed: several reasoning updates, then several answer updates, never interleaved
    changes = "".join(page.evaluate("() => window.__changes"))
    assert re.fullmatch(r"r{2,}a{2,}", changes), changes
    # the thinking block folds away once the answer starts; usage is shown
    assert page.evaluate("() => document.querySelector('details.thinking').open") is False
    assert page.text_content("summary").startswith("Thought for")
    wait_for(page, "() => document.querySelector('.meta').textContent.includes('reasoning')")

    # second turn: the history carries the first answer without its reasoning
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else 0)
    page.fill("#input", "And at night?")
    page.press("#input", "Enter")
    wait_for(page, "() => document.querySelectorAll('.answer').length === 2 && "
                   "document.querySelectorAll('.answer')[1].textContent.length > 10")
    assert sent[0]["messages"] == [{"role": "user", "content": "What colour is the sky?"},
                                   {"role": "assistant", "content": ANSWER},
                                   {"role": "user", "content": "And at night?"}]
    assert sent[0]["stream"] is True
    assert errors == []
    page.close()


def test_stop_button_aborts_and_frees_the_request(server, browser):
    url, app = server
    engine = app.state.server.engine
    step = engine.step

    def slow_step():  # 0.2 s per step: the answer is still being written when Stop is pressed
        time.sleep(0.2)
        return step()

    cancelled = metric(url, 'nanoseek_requests_total{finish_reason="cancelled"}')
    engine.step = slow_step
    try:
        page = browser.new_page()
        page.goto(url)
        wait_for(page, "() => document.getElementById('model').textContent.startsWith('tiny')")
        page.fill("#input", "hello")
        page.click("#send")
        wait_for(page, "() => document.querySelector('.reasoning') && "
                       "document.querySelector('.reasoning').textContent.length > 0")
        assert page.is_enabled("#stop") and page.is_disabled("#send")
        page.click("#stop")
        wait_for(page, "() => document.querySelector('.meta').textContent === '(stopped)'")
        assert page.is_enabled("#send") and page.is_disabled("#stop")
        assert page.text_content(".answer") != ANSWER
        deadline = time.monotonic() + 10  # the server cancels the request; the engine frees its slot next step
        while (metric(url, 'nanoseek_requests_total{finish_reason="cancelled"}') != cancelled + 1
               or metric(url, "nanoseek_active_slots") != 0):
            assert time.monotonic() < deadline, "the server did not cancel the aborted request"
            time.sleep(0.05)
        page.close()
    finally:
        engine.step = step


def test_page_never_builds_markup_from_strings():
    from nanoseek.serving.app import INDEX_HTML

    html = INDEX_HTML.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in html
    assert not re.search(r"""(src|href)=["']https?://""", html)  # no CDN: the machine may have no internet
