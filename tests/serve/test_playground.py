"""The playground page (``GET /``): served as HTML over real HTTP, and driven in a real headless
Chromium against the running server, whose answers it must show exactly as the ``openai`` client
gets them. The browser tests skip when Chromium or chromedriver is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
IDS = ("model-a", "model-b", "api-key", "prompt", "max-tokens", "temperature", "send")
PANES = ("answer-a", "answer-b")
WAIT = 120  # seconds a browser step may take before the test gives up (a timeout, not a check)


def test_root_serves_the_playground_page_with_its_controls(server):
    """``GET /`` is a 200 ``text/html`` page holding every control and both answer panes, and it
    loads nothing from outside the server (no external scripts, styles or fonts)."""
    response = server.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for name in IDS + PANES:
        assert f'id="{name}"' in page, name
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "innerHTML" not in page  # model output goes in as text, never as markup


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium driven by chromedriver with a fresh profile; skips when either binary
    is absent."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists():
            pytest.skip(f"{binary} is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def open_page(driver, server):
    """Load the playground and wait until its model lists are filled from ``/v1/models``."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    WebDriverWait(driver, WAIT).until(
        lambda d: d.execute_script("return document.getElementById('model-b').options.length")
    )


def options_of(driver, select_id: str) -> list[str]:
    script = "return Array.from(document.getElementById(arguments[0]).options, o => o.value)"
    return driver.execute_script(script, select_id)


def send(driver, model_a: str, model_b: str, prompt: str, max_tokens: int) -> dict:
    """Pick the two models, type the prompt and max tokens, click Send, wait for both panes to
    be done, and return each pane's text and attributes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(driver.find_element(By.ID, "model-a")).select_by_value(model_a)
    Select(driver.find_element(By.ID, "model-b")).select_by_value(model_b)
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    driver.find_element(By.ID, "send").click()
    done = "return [...arguments].every(id => document.getElementById(id).dataset.done === 'true')"
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(done, *PANES))
    read = """const p = document.getElementById(arguments[0]);
              return {text: p.textContent, error: p.dataset.error || null};"""
    return {pane: driver.execute_script(read, pane) for pane in PANES}


def api_answer(client, model: str, prompt: str, max_tokens: int) -> str:
    """What the ``openai`` client gets for the request the page makes (greedy, not streamed)."""
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return out.choices[0].message.content


def test_browser_streams_both_models_and_shows_exactly_what_the_api_answers(server, browser):
    """In a real browser the page lists the base and every adapter (the first two picked by
    default, temperature 0 and 64 max tokens preset), streams the base and adapter "alpha" side
    by side, and each pane ends with exactly the text the ``openai`` client gets for the same
    request, with no error."""
    open_page(browser, server)
    names = [server.base, "alpha", "beta", "gamma"]
    assert sorted(options_of(browser, "model-a")) == sorted(names)
    assert options_of(browser, "model-b") == options_of(browser, "model-a")
    value = "return document.getElementById(arguments[0]).value"
    first_two = options_of(browser, "model-a")[:2]
    assert [browser.execute_script(value, i) for i in ("model-a", "model-b")] == first_two
    assert browser.execute_script(value, "temperature") == "0"
    assert browser.execute_script(value, "max-tokens") == "64"

    prompt, max_tokens = "what is a date? <b>&amp;</b>", 24
    shown = send(browser, server.base, "alpha", prompt, max_tokens)

    for pane, model in zip(PANES, (server.base, "alpha")):
        expected = api_answer(server.client(), model, prompt, max_tokens)
        assert shown[pane] == {"text": expected, "error": None}, model
    assert shown["answer-a"]["text"] != shown["answer-b"]["text"]  # two models, two answers


def test_browser_shows_the_servers_error_message_in_each_pane(server, browser):
    """A request the server refuses (max tokens over its limit: a 400 JSON error body) ends both
    panes as done, marked as errors, with the server's own message as their text."""
    open_page(browser, server)
    limit = server.settings.max_tokens
    shown = send(browser, server.base, "alpha", "hello", limit + 1)
    for pane in PANES:
        assert shown[pane]["error"] == "true"
        assert f"allows at most {limit}" in shown[pane]["text"]


def test_browser_sends_the_api_key_it_is_given(served, browser):
    """Against a server that wants an API key, the page says it cannot list the models until the
    key is typed in; with the key it lists them and both answers stream without an error (so the
    key goes with every request as ``Authorization: Bearer KEY``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from serving import Running

    base_dir, adapters = served
    keyed = Running(base=str(base_dir), adapters=str(adapters), api_key="sesame")
    try:
        browser.get(keyed.url + "/")
        status = "return document.getElementById('status').textContent"
        WebDriverWait(browser, WAIT).until(lambda d: d.execute_script(status))
        assert "API key" in browser.execute_script(status)
        assert options_of(browser, "model-a") == []
        key = browser.find_element(By.ID, "api-key")
        key.send_keys("sesame")
        browser.find_element(By.ID, "prompt").click()  # leaving the field fires its change event
        WebDriverWait(browser, WAIT).until(lambda d: options_of(d, "model-b"))
        assert browser.execute_script(status) == ""
        shown = send(browser, keyed.base, "alpha", "hello", 8)
        client = keyed.client(key="sesame")
        for pane, model in zip(PANES, (keyed.base, "alpha")):
            expected = api_answer(client, model, "hello", 8)
            assert shown[pane] == {"text": expected, "error": None}, model
    finally:
        keyed.stop()
