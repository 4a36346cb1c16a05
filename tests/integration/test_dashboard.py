"""
The dashboard in a real browser (headless Chromium through Selenium) against
a real Jano process: live numbers appear, nulls never show as 0, swaps land
on the timeline, the telemetry-token form works, the model table's Load
and Unload buttons work (asking for the admin key when one is set), a
stalled model is shown as such, and so is a reload the backend did on its own;
the history charts and the per-caller table come from Jano's usage history,
across a page reload and a restart of Jano.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import require
from procs import (ROOT, Proc, free_port, get, jano_config, post_json, source_env,
                   start_fake_backend, start_jano, stream_until_closed, twistd_argv, wait_until)

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 15.0
NOT_REPORTED = "—not reported"  # the muted dash plus its screen-reader text


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(os.path.exists(CHROMIUM) or bool(shutil.which("chromium")),
            "chromium is not installed (apt-get install chromium chromium-driver)")
    require(os.path.exists(CHROMEDRIVER), "chromedriver is not installed (apt-get install chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require(False, "selenium is not installed (pip install '.[test]')")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1000"):
        options.add_argument(arg)
    profile = tempfile.mkdtemp(prefix="jano-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else str(shutil.which("chromium"))
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _text(driver: Any, css: str) -> str:
    """Everything in the element, visible or only for screen readers."""
    return str(driver.find_element("css selector", css).get_attribute("textContent")).strip()


def _wait(driver: Any, what: str, check: Any) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the page rebuilds a table when its data changes: an element found may be gone a moment later
    WebDriverWait(driver, WAIT, poll_frequency=0.1,
                  ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: check(d), message=what)


def _rows(driver: Any) -> list[Any]:
    return list(driver.find_elements("css selector", "#requests tbody tr[data-testid=request-row]"))


def _start_demo(tmp_path: Path) -> Proc:
    port = free_port()
    log = tmp_path / "demo.log"
    popen = subprocess.Popen([*twistd_argv(), "-n", "--pidfile=", "-l", str(log), "jano", "--demo",
                              "--listen", f"tcp:{port}:interface=127.0.0.1"],
                             env=source_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    jano = Proc(popen, port, log)
    try:
        wait_until(lambda: get(jano.url + "/health")[0] == 200, 20, "demo", jano)
    except BaseException:
        jano.stop()
        raise
    return jano


_ROW = "const row = document.querySelector(`#models tbody tr[data-model=\"${arguments[0]}\"]`);"


def _model_state(driver: Any, model: str) -> str:
    """The row's state: loaded, loading, unloading, unloaded or always_on."""
    return str(driver.execute_script(_ROW + "return row && row.dataset.state;", model))


def _actions(driver: Any, model: str) -> list[str]:
    """The load/unload buttons in the model's row, by what they do."""
    return list(driver.execute_script(
        _ROW + "return row ? [...row.querySelectorAll('button[data-action]')].map(b => b.dataset.action) : [];",
        model))


def _click(driver: Any, model: str, action: str) -> None:
    """Click the model's Load or Unload button once it is there (and enabled)."""
    def click(d: Any) -> bool:
        for b in d.find_elements("css selector", f'#models tbody tr[data-model="{model}"] '
                                                 f'button[data-action="{action}"]:enabled'):
            b.click()
            return True
        return False

    _wait(driver, f"{action} button of {model}", click)


def _note(driver: Any) -> tuple[str, str]:
    """What the page says about the last load or unload: (kind, text)."""
    el = driver.find_element("id", "model-action")
    return str(el.get_attribute("data-kind")), str(el.get_attribute("textContent"))


def _slow_stream(url: str, model: str) -> socket.socket:
    """A streamed chat completion that runs for minutes, until the socket is closed."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps({"model": model, "stream": True, "max_tokens": 1000, "messages": []}).encode()
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                 "Content-Type: application/json\r\nX-Fake-Delay-Ms: 250\r\n\r\n".encode() + data)
    return sock


def _fetched(driver: Any) -> list[str]:
    """The URLs the page has fetched so far."""
    return list(driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"))


def _color(driver: Any, css: str) -> str:
    """A CSS colour (a custom property, say) as the browser computes it."""
    return str(driver.execute_script(
        "const el = document.body.appendChild(document.createElement('i'));"
        "el.style.color = arguments[0]; const c = getComputedStyle(el).color; el.remove(); return c;", css))


def _screenshot(driver: Any) -> None:
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, height)
    chrome = height - int(driver.execute_script("return window.innerHeight"))
    driver.set_window_size(1280, min(height + chrome, 2400))
    driver.execute_script("window.dispatchEvent(new Event('resize'))")
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    driver.save_screenshot(str(out / "dashboard.png"))
    driver.set_window_size(1280, 1000)
    if os.environ.get("JANO_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(out / "dashboard.png", ROOT / "docs" / "dashboard.png")


def test_dashboard_shows_the_demo_box_live(tmp_path: Path, browser: Any) -> None:
    jano = _start_demo(tmp_path)
    try:
        browser.get(jano.url + "/ui")
        _wait(browser, "first poll", lambda d: _text(d, "#conn").startswith("live"))

        # Before any request: nothing is loaded and nothing is invented.
        assert _text(browser, "#tok-s") == "not reported"
        assert _text(browser, "#current-model") == "nothing loaded"
        assert _text(browser, "#oldest-waiting") == "nobody"
        assert _rows(browser) == []
        for cell in browser.find_elements("css selector", "#models [data-testid=model-tok-s]"):
            assert cell.get_attribute("textContent") == NOT_REPORTED
        assert browser.find_elements("css selector", "#swap-timeline [data-result]") == []
        assert not browser.find_element("id", "thrash-warning").is_displayed()

        # The page is also served at / to a browser; its assets resolve from there too.
        status, headers, body = get(jano.url + "/", headers={"accept": "text/html"})
        assert status == 200 and b'src="ui/app.js"' in body
        for asset in ("app.js", "style.css"):
            assert get(jano.url + "/ui/" + asset)[0] == 200

        for name, stream in (("demo-chat", True), ("demo-coder", False), ("demo-chat", False),
                             ("demo-coder", True)):
            status, _, body = post_json(jano.url + "/v1/chat/completions",
                                        {"model": name, "messages": [], "max_tokens": 12,
                                         "stream": stream})
            assert status == 200, body

        def live(d: Any) -> bool:
            return (_text(d, "#current-model") == "demo-coder" and len(_rows(d)) >= 4
                    and len(d.find_elements("css selector", '#swap-timeline [data-result="ok"]')) >= 4
                    and re.fullmatch(r"\d+(\.\d+)? tok/s", _text(d, "#tok-s")) is not None)

        _wait(browser, "live numbers after a swap", live)
        assert _text(browser, "#swaps-hour") == "4"
        # The demo's servers are processes Jano runs: the resident one's log is on the page.
        _wait(browser, "the resident server's log",
              lambda d: "server is listening" in _text(d, "#server-log"))
        assert browser.find_element("id", "server-panel").is_displayed()
        assert "demo-coder" in _text(browser, "#server-panel")
        rows = [r.get_attribute("textContent") for r in _rows(browser)]
        assert "demo-coder" in rows[0] and "200" in rows[0] and "completed" in rows[0]
        assert "demo-chat" in rows[-1] and "stream" in rows[-1]
        swaps = browser.find_elements("css selector", "#swap-list li[data-result=ok]")
        assert "demo-chat → demo-coder" in swaps[0].get_attribute("textContent")
        assert not browser.find_element("id", "thrash-warning").is_displayed()

        # Drawn from what the server says, whatever it says: feed the page a thrashing
        # box with a failed swap and a request whose numbers were never reported.
        st = json.loads(get(jano.url + "/status")[2])
        st["swapsLastHour"] = st["thrashSwapsPerHour"] + 1
        st["recentSwaps"].insert(0, {**st["recentSwaps"][0], "result": "failed", "error": "exit 1",
                                     "to": "demo-chat", "from": "demo-coder",
                                     "startedAt": st["recentSwaps"][0]["at"]})
        st["recentGenTokS"] = None
        row: dict[str, Any] = {k: None for k in ("queueWaitMs", "ttfbMs", "durationMs", "promptTokens",
                                 "cachedTokens", "completionTokens", "genTokS", "genTokSSource",
                                 "promptTokS", "usageSource")}
        row.update(id=99, model="demo-chat", method="POST", path="/v1/chat/completions",
                   status=502, stream=False, arrivedAt=st["startedAt"], waitedForSwap=False,
                   outcome="upstream_error")
        shown = browser.execute_script(
            "janoDashboard.show(arguments[0], arguments[1]);"
            "const w = document.getElementById('thrash-warning');"
            "const cells = [...document.querySelectorAll('#requests tbody tr')][0].cells;"
            "return {warn: !w.hidden && w.textContent, tok: document.getElementById('tok-s').textContent,"
            " failed: document.querySelectorAll('#swap-timeline [data-result=failed]').length,"
            " cells: [...cells].map(c => c.textContent)};",
            st, {"data": [row], "limit": 20})
        assert "Thrashing" in shown["warn"] and str(st["swapsLastHour"]) in shown["warn"]
        assert shown["tok"] == "not reported" and shown["failed"] == 1
        # wait, first byte, total, tokens in -> out, tok/s: all unreported, none of them "0"
        assert shown["cells"][3:8] == [NOT_REPORTED, NOT_REPORTED, NOT_REPORTED,
                                       f"{NOT_REPORTED} → {NOT_REPORTED}", NOT_REPORTED]
        assert shown["cells"][8] == "backend error"

        # A crashed server's cause is on the page, word for word.
        st = json.loads(get(jano.url + "/status")[2])
        st["processes"]["demo-coder"].update(state="crashed", last_failure="demo-coder killed by "
                                             "signal 9 (SIGKILL): CUDA error: out of memory")
        failure = browser.execute_script(
            "janoDashboard.show(arguments[0], arguments[1]);"
            "return document.getElementById('server-failure').textContent;", st,
            {"data": [], "limit": 20})
        assert failure == "demo-coder killed by signal 9 (SIGKILL): CUDA error: out of memory"

        # A group with a memory budget lists every resident and the configured figures.
        st["groups"] = {"gpu0": {**st["groups"]["default"], "resident": "demo-coder",
                                 "residents": ["demo-chat", "demo-coder"],
                                 "memoryBudgetMiB": 24576, "memoryUsedMiB": 7168}}
        groups = browser.execute_script(
            "janoDashboard.show(arguments[0], arguments[1]);"
            "const g = document.getElementById('groups');"
            "return {shown: !g.hidden, text: g.textContent};", st, {"data": [], "limit": 20})
        assert groups["shown"], "one budget group is worth listing"
        assert "gpu0: demo-chat, demo-coder" in groups["text"]
        assert "7 GiB of 24 GiB configured" in groups["text"]
    finally:
        jano.stop()


def test_dashboard_asks_for_the_telemetry_token(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    backend = start_fake_backend(tmp_path, model="m", flavor="openai")
    jano: Proc | None = None
    try:
        jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True,
                                                extra='telemetry_key = "t0ken"'))
        assert get(jano.url + "/status")[0] == 401
        browser.get(jano.url + "/ui")
        form = browser.find_element(By.ID, "auth-form")
        _wait(browser, "token form", lambda d: form.is_displayed())
        assert form.get_attribute("data-state") == "needed"
        assert browser.execute_script("return sessionStorage.getItem('jano.telemetryToken')") is None

        def submit(token: str) -> None:
            field = browser.find_element(By.ID, "token-input")
            field.clear()
            field.send_keys(token)
            browser.find_element(By.ID, "token-submit").click()

        submit("wrong")  # a wrong token asks again, saying so
        _wait(browser, "token rejected",
              lambda d: form.is_displayed() and form.get_attribute("data-state") == "rejected")
        submit("t0ken")
        _wait(browser, "polling with the token", lambda d: _text(d, "#conn").startswith("live"))
        assert not form.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('jano.telemetryToken')") == "t0ken"

        status, _, body = post_json(jano.url + "/v1/chat/completions",
                                    {"model": "m", "messages": [], "max_tokens": 5})
        assert status == 200, body
        _wait(browser, "a request row", lambda d: len(_rows(d)) == 1)
        cells = [c.get_attribute("textContent") for c in _rows(browser)[0].find_elements(By.TAG_NAME, "td")]
        assert cells[1] == "m" and cells[2] == "200" and cells[8] == "completed"
        usage = json.loads(get(jano.url + "/usage?limit=1",
                               headers={"authorization": "Bearer t0ken"})[2])["data"][0]
        # an OpenAI-style backend reports no timings: tok/s is "not reported", not 0
        assert usage["genTokS"] is None and cells[7] == NOT_REPORTED
        # always_on models belong to no swap group: listed with their health, never "loaded",
        # and with nothing to load or unload
        assert _text(browser, "#models tbody tr[data-model=m] th") == "m"
        assert _model_state(browser, "m") == "always_on" and _actions(browser, "m") == []
        assert _text(browser, "#models tbody tr[data-model=m] td:last-child") == "always on"
    finally:
        if jano is not None:
            jano.stop()
        backend.stop()


def test_dashboard_loads_and_unloads_models(tmp_path: Path, browser: Any) -> None:
    jano = _start_demo(tmp_path)
    stream: socket.socket | None = None
    try:
        browser.get(jano.url + "/ui")
        _wait(browser, "first poll", lambda d: _text(d, "#conn").startswith("live"))
        # Nothing loaded: each model can be loaded, none unloaded.
        _wait(browser, "load buttons", lambda d: all(
            _actions(d, m) == ["load"] and _model_state(d, m) == "unloaded"
            for m in ("demo-chat", "demo-coder")))
        assert _note(browser)[1] == ""

        _click(browser, "demo-chat", "load")
        _wait(browser, "demo-chat loaded", lambda d: _model_state(d, "demo-chat") == "loaded"
              and _actions(d, "demo-chat") == ["unload"] and _text(d, "#current-model") == "demo-chat")
        assert _note(browser) == ("ok", "demo-chat: loading…")
        assert _actions(browser, "demo-coder") == ["load"]
        assert _text(browser, "#last-swap").startswith("last: nothing → demo-chat, ")

        # Unload: the slot empties, and the timeline and the last swap say so.
        _click(browser, "demo-chat", "unload")
        _wait(browser, "demo-chat unloaded", lambda d: _model_state(d, "demo-chat") == "unloaded"
              and _actions(d, "demo-chat") == ["load"] and _text(d, "#current-model") == "nothing loaded")
        unloaded = "demo-chat → nothing (unloaded, requested)"
        _wait(browser, "the unload on the timeline", lambda d: _text(d, "#last-swap").startswith(
            f"last: {unloaded}, ") and len(d.find_elements(
                "css selector", '#swap-timeline [data-kind="unload"][data-result="ok"]')) == 1)
        assert _note(browser) == ("ok", "demo-chat: unloading…")
        newest = browser.find_element("css selector", "#swap-list li")
        assert newest.get_attribute("data-kind") == "unload" and unloaded in _text(browser, "#swap-list li")
        assert "null" not in _text(browser, "#swap-list") + _text(browser, "#last-swap")
        title = _text(browser, '#swap-timeline [data-kind="unload"] title')
        assert title.startswith(f"{unloaded}: ok, ")

        _click(browser, "demo-coder", "load")
        _wait(browser, "demo-coder loaded", lambda d: _model_state(d, "demo-coder") == "loaded"
              and _text(d, "#current-model") == "demo-coder")

        # A long stream holds demo-coder: Jano never evicts it, and the page says why.
        stream = _slow_stream(jano.url, "demo-coder")
        _wait(browser, "the stream in flight",
              lambda d: _text(d, '#models tbody tr[data-model="demo-coder"] td:nth-of-type(3)') == "1")
        _click(browser, "demo-chat", "load")
        _wait(browser, "the 409 shown", lambda d: _note(d)[0] == "error")
        kind, text = _note(browser)
        assert text.startswith("demo-chat: group 'default' has 1 requests in flight for 'demo-coder'")
        _click(browser, "demo-coder", "unload")
        _wait(browser, "the 409 shown", lambda d: _note(d)[1].startswith("demo-coder: "))
        assert _note(browser)[0] == "error" and "in flight" in _note(browser)[1]
        assert _model_state(browser, "demo-coder") == "loaded"
        assert _model_state(browser, "demo-chat") == "unloaded"

        stream.close()  # the client leaves; then the model can go
        stream = None
        _wait(browser, "the stream ended",
              lambda d: _text(d, '#models tbody tr[data-model="demo-coder"] td:nth-of-type(3)') == "0")
        _click(browser, "demo-coder", "unload")
        _wait(browser, "demo-coder unloaded", lambda d: _model_state(d, "demo-coder") == "unloaded"
              and _text(d, "#last-swap").startswith("last: demo-coder → nothing (unloaded, requested), "))
    finally:
        if stream is not None:
            stream.close()
        jano.stop()


def test_dashboard_asks_for_the_admin_key(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    a = start_fake_backend(tmp_path, model="a")
    b = start_fake_backend(tmp_path, model="b")
    script = tmp_path / "swap.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    jano: Proc | None = None
    try:
        # /status is open, loading and unloading take the admin key.
        jano = start_jano(tmp_path, jano_config([("a", a.url), ("b", b.url)], swap=[str(script), "{model}"],
                                                extra='admin_key = "adm1n"'))
        browser.get(jano.url + "/ui")
        _wait(browser, "first poll", lambda d: _text(d, "#conn").startswith("live"))
        form = browser.find_element(By.ID, "auth-form")
        assert not form.is_displayed()

        _click(browser, "a", "load")
        _wait(browser, "admin key form", lambda d: form.is_displayed())
        assert form.get_attribute("data-for") == "admin" and form.get_attribute("data-state") == "needed"
        assert _text(browser, "#auth-title") == "Admin key needed"
        # asked for below the model table, where the button was
        assert browser.execute_script(
            "return document.getElementById('models-panel').nextElementSibling.id") == "auth-form"
        assert _note(browser) == ("error", "a: missing or wrong bearer token")
        browser.find_element(By.ID, "token-cancel").click()  # cancel: nothing happens
        assert not form.is_displayed() and _model_state(browser, "a") == "unloaded"

        def submit(token: str) -> None:
            field = browser.find_element(By.ID, "token-input")
            field.clear()
            field.send_keys(token)
            browser.find_element(By.ID, "token-submit").click()

        _click(browser, "a", "load")
        _wait(browser, "admin key form again", lambda d: form.is_displayed())
        submit("wrong")  # a wrong key asks again, saying so
        _wait(browser, "key rejected",
              lambda d: form.is_displayed() and form.get_attribute("data-state") == "rejected")
        assert _model_state(browser, "a") == "unloaded"
        submit("adm1n")  # the load is retried with it
        _wait(browser, "a loaded", lambda d: _model_state(d, "a") == "loaded" and _actions(d, "a") == ["unload"])
        assert not form.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('jano.adminKey')") == "adm1n"
        assert browser.execute_script("return sessionStorage.getItem('jano.telemetryToken')") is None
        assert _text(browser, "#conn").startswith("live")

        # The key is kept for the tab: the next unload needs no prompt.
        _click(browser, "a", "unload")
        _wait(browser, "a unloaded", lambda d: _model_state(d, "a") == "unloaded"
              and _text(d, "#last-swap").startswith("last: a → nothing (unloaded, requested), "))
        assert not form.is_displayed()
        assert _actions(browser, "b") == ["load"]
    finally:
        if jano is not None:
            jano.stop()
        a.stop()
        b.stop()


def test_dashboard_shows_a_stalled_model(tmp_path: Path, browser: Any) -> None:
    backend = start_fake_backend(tmp_path, model="m")
    jano: Proc | None = None
    try:
        # api_key guards the model routes, not /status: the page polls without it, and asks
        # nothing of v1/models (which would answer 401 on every poll)
        jano = start_jano(tmp_path, jano_config(
            [("m", backend.url)], always_on=True,
            extra='api_key = "k3y"\nstall_timeout = 1.0\nstall_threshold = 2\nstall_cooldown = 60.0'))
        browser.get(jano.url + "/ui")
        _wait(browser, "first poll", lambda d: _text(d, "#conn").startswith("live"))
        _wait(browser, "m up", lambda d: _model_state(d, "m") == "always_on"
              and _text(d, '#models tbody tr[data-model="m"] td:nth-of-type(1)') == "up")
        assert not browser.find_element("id", "stuck-warning").is_displayed()

        # Two streams that send one chunk then go quiet: Jano cuts each after 1 s, and the
        # second in a row marks the model stalled.
        for _ in range(2):
            raw = stream_until_closed(
                jano.url, {"model": "m", "stream": True, "max_tokens": 5, "messages": []},
                {"X-Fake-Delay-Ms": "30000", "Authorization": "Bearer k3y"})
            assert raw.startswith(b"HTTP/1.1 200") and not raw.endswith(b"0\r\n\r\n")
        status = json.loads(get(jano.url + "/status")[2])
        assert status["backendHealth"]["m"] == "stalled"
        reason = status["modelsDown"]["m"]["reason"]
        assert reason.startswith("stalled: ")

        health = '#models tbody tr[data-model="m"] td:nth-of-type(1) .health'
        _wait(browser, "m shown stalled", lambda d: _text(d, health) == "stalled")
        row = browser.find_element("css selector", '#models tbody tr[data-model="m"]')
        assert row.get_attribute("data-health") == "stalled"
        badge = browser.find_element("css selector", health)
        assert "h-stalled" in str(badge.get_attribute("class")) and badge.get_attribute("title") == reason
        # not drawn like a plain "down": a badge of its own
        assert badge.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent")
        note = _text(browser, '#models tbody tr[data-model="m"] td:nth-of-type(5)')
        assert note.startswith("refused (503) until ") and note.endswith(": " + reason)

        # The two requests: ended as stalled, with no load time (llama.cpp reports none), not 0.
        _wait(browser, "two stalled requests", lambda d: len(_rows(d)) == 2)
        for r in _rows(browser):
            assert r.get_attribute("data-outcome") == "upstream_stalled"
            cells = r.find_elements("tag name", "td")
            assert cells[8].get_attribute("textContent") == "stalled"
            assert cells[5].get_dom_attribute("title") is None
        assert not [u for u in _fetched(browser) if "v1/models" in u]

        # A stuck scheduler gets a warning line of its own, drawn from what the server says.
        status = json.loads(get(jano.url + "/status")[2])
        browser.execute_script("janoDashboard.show(arguments[0], arguments[1])",
                               {**status, "schedulerStuck": True}, {"data": [], "limit": 20})
        warning = browser.find_element("id", "stuck-warning")
        assert warning.is_displayed() and "scheduler looks stuck" in warning.text
        _wait(browser, "the next poll clears it", lambda d: not warning.is_displayed())
    finally:
        if jano is not None:
            jano.stop()
        backend.stop()


def test_dashboard_shows_a_hidden_reload(tmp_path: Path, browser: Any) -> None:
    backend = start_fake_backend(tmp_path, model="m", flavor="ollama")
    jano: Proc | None = None
    try:
        jano = start_jano(tmp_path, jano_config([("m", backend.url)], always_on=True))
        browser.get(jano.url + "/ui")
        _wait(browser, "first poll", lambda d: _text(d, "#conn").startswith("live"))
        assert _text(browser, "#hidden-reloads") == "hidden reloads, last hour: 0"

        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        assert post_json(jano.url + "/api/chat", chat)[0] == 200  # Ollama's usual 1 ms load
        assert post_json(jano.url + "/api/chat", chat, headers={"X-Fake-Load-Ms": "2500"})[0] == 200

        reload_mark = '#swap-timeline [data-kind="reload"]'
        _wait(browser, "the reload shown", lambda d: len(d.find_elements("css selector", reload_mark)) == 1
              and _text(d, "#hidden-reloads") == "hidden reloads, last hour: 1 (2.50 s)"
              and len(_rows(d)) == 2)
        mark = browser.find_element("css selector", reload_mark)
        assert "k-reload" in str(mark.get_attribute("class"))
        assert _text(browser, reload_mark + " title").startswith("model m reloaded by the backend, 2.50 s, at ")
        # its own colour, not a swap's
        fill = browser.execute_script("return getComputedStyle(arguments[0]).fill",
                                      browser.find_element("css selector", reload_mark + " rect"))
        assert fill == _color(browser, "var(--reload)") != _color(browser, "var(--swap)")

        item = browser.find_element("css selector", "#swap-list li")
        assert item.get_attribute("data-kind") == "reload"
        text = _text(browser, "#swap-list li")
        assert "m reloaded by the backend 2.50 s hidden reload" in text and "→" not in text
        assert "reloaded by the backend" in _text(browser, "#timeline-legend")
        # not a swap Jano made: the swap figures stay as they were
        assert _text(browser, "#swaps-hour") == "0" and _text(browser, "#last-swap") == "no swaps yet"

        # the requests' load times, in the Total cell's tooltip
        titles = [r.find_elements("tag name", "td")[5].get_attribute("title") for r in _rows(browser)]
        assert titles == ["the backend reports 2.50 s loading the model",
                          "the backend reports 1 ms loading the model"]
        assert "null" not in _text(browser, "#swap-list") + _text(browser, "#hidden-reloads")
    finally:
        if jano is not None:
            jano.stop()
        backend.stop()


def _bars(driver: Any, chart: str) -> list[float]:
    """The values of a history chart's bars (a bucket with no sample has none)."""
    return [float(v) for v in driver.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} rect.bar`)].map(r => r.dataset.value)", chart)]


def _callers(driver: Any) -> dict[str, str]:
    """The per-caller table: caller ("" for no named key) -> requests."""
    return dict(driver.execute_script(
        "return [...document.querySelectorAll('#callers tbody tr[data-testid=caller-row]')]"
        ".map(r => [r.dataset.caller, r.querySelector('[data-testid=caller-requests]').textContent])"))


def test_dashboard_shows_the_stored_history(tmp_path: Path, browser: Any) -> None:
    chat = start_fake_backend(tmp_path, model="chat", extra=("--gen-tok-s", "62"))
    coder = start_fake_backend(tmp_path, model="coder", extra=("--gen-tok-s", "34"))
    script = tmp_path / "swap.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    db = tmp_path / "history" / "usage.sqlite3"
    db.parent.mkdir()
    keys = "\n".join(['api_key = "k-plain"'] + [f'[[server.api_keys]]\nname = "{n}"\nkey = "k-{n}"'
                                                 for n in ("laptop", "ci")])
    config = jano_config([("chat", chat.url), ("coder", coder.url)], swap=[str(script), "{model}"],
                         extra=f'{keys}\n[telemetry]\ndatabase = "{db}"')
    port = free_port()
    jano = start_jano(tmp_path, config, port=port)
    try:
        calls = [("laptop", "chat"), ("laptop", "coder"), ("laptop", "chat"), ("ci", "coder"),
                 ("ci", "coder"), ("plain", "chat")]
        for caller, model in calls:
            status, _, body = post_json(jano.url + "/v1/chat/completions",
                                        {"model": model, "messages": [], "max_tokens": 16},
                                        headers={"authorization": f"Bearer k-{caller}"})
            assert status == 200, body
        wait_until(lambda: len(json.loads(get(jano.url + "/usage?since=0")[2])["data"]) == 6,
                   10, "the records stored", jano)

        browser.get(jano.url + "/ui")
        _wait(browser, "first poll", lambda d: _text(d, "#conn").startswith("live"))
        # Most requests first; the plain api_key is a caller without a name.
        _wait(browser, "the callers", lambda d: _callers(d) == {"laptop": "3", "ci": "2", "": "1"})
        assert list(_callers(browser)) == ["laptop", "ci", ""]
        assert _text(browser, '#callers tr[data-caller=""] th') == "(no named key)"
        row = [str(c.get_attribute("textContent")) for c in
               browser.find_elements("css selector", '#callers tr[data-caller="laptop"] td')]
        assert row[:3] == ["3", "3", "0"] and re.fullmatch(r"\d+ → 48", row[3])
        assert re.fullmatch(r"[1-9]\d\.\d", row[4]), row  # backend-timed, between 34 and 62
        assert all(re.fullmatch(r"\d+ ms|\d\.\d\d s", c) for c in row[5:7]), row
        assert [c.get_attribute("textContent") for c in browser.find_elements(
            "css selector", "#requests tbody tr td:last-child")] == ["—no named key", "ci", "ci",
                                                                    "laptop", "laptop", "laptop"]

        # Jano samples every 10 s, by itself: wait for the sample that counts the six requests.
        def sampled() -> list[dict[str, Any]]:
            data: list[dict[str, Any]] = json.loads(get(jano.url + "/usage/series")[2])["data"]
            return data if sum(p["requests"] or 0 for p in data) == 6 else []

        series = wait_until(sampled, 25, "the first history sample", jano)
        swaps = sum(p["swaps"] or 0 for p in series)
        assert swaps >= 4

        # Switching to the last day fetches the history again, in hourly buckets.
        browser.find_element("css selector", '#history-span button[data-span="day"]').click()
        _wait(browser, "the day's history", lambda d: sum(_bars(d, "hist-req")) == 6)
        assert _text(browser, "#hist-req-cap") == "Requests finished per hour"
        assert _text(browser, "#hist-swap-cap") == "Swaps per hour"
        assert sum(_bars(browser, "hist-swap")) == swaps
        assert browser.find_element("css selector", '#history-span button[data-span="day"]').get_attribute(
            "aria-pressed") == "true"
        browser.find_element("css selector", '#history-span button[data-span="hour"]').click()
        _wait(browser, "the hour's history", lambda d: _text(d, "#hist-req-cap") == "Requests finished per 5 min"
              and sum(_bars(d, "hist-req")) == 6)
        assert sum(_bars(browser, "hist-swap")) == swaps
        assert browser.find_element("css selector", "#hist-tok path.line").get_attribute("d").startswith("M")
        legend = _text(browser, "#hist-tok-legend")
        assert re.match(r"latest sample: \d+(\.\d)? tok/s", legend), legend
        # per model, from the summary: the fake backends generate at 62 and 34 tok/s
        assert re.search(r"chat 6\d\.\d tok/s", legend) and re.search(r"coder 3\d\.\d tok/s", legend), legend
        note = _text(browser, "#history-note")
        assert re.match(r"\d+ samples? in the last hour, the oldest at ", note), note
        _screenshot(browser)

        # Jano restarts on the same database: its ring is new, its history is not.
        jano.stop()
        jano = start_jano(tmp_path, config, port=port)
        browser.get(jano.url + "/ui")
        _wait(browser, "first poll after the restart", lambda d: _text(d, "#conn").startswith("live"))
        _wait(browser, "the callers again", lambda d: _callers(d) == {"laptop": "3", "ci": "2", "": "1"}
              and sum(_bars(d, "hist-req")) == 6)
        assert _rows(browser) == []
        assert sum(_bars(browser, "hist-swap")) == swaps

        # A null is a gap, never a 0: a sample without tokens/s breaks the line, one without
        # a request count has no bar.
        shown = browser.execute_script(
            "const hs = janoDashboard.state.hist, t = Date.now() + janoDashboard.state.skew;"
            "hs.series = [40, 30, 20, 10].map((ago, i) => ({t: t - ago * 1000, tokS: i === 2 ? null : 40,"
            " requests: null, queueDepth: i, inFlight: 1, swaps: 0}));"
            "janoDashboard.renderHistory();"
            "return {d: document.querySelector('#hist-tok path.line').getAttribute('d'),"
            " bars: document.querySelectorAll('#hist-req rect').length,"
            " empty: document.querySelector('#hist-req text.empty').textContent,"
            " zero: document.querySelectorAll('#hist-swap rect.bar.zero').length}")
        assert shown["d"].count("M") == 2 and shown["bars"] == 0 and shown["zero"] >= 1
        assert shown["empty"] == "nothing reported in these samples"
    finally:
        jano.stop()
        chat.stop()
        coder.stop()
