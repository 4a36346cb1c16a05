"""
The dashboard in a real browser (headless Chromium through Selenium) against
a real Jano process: live numbers appear, nulls never show as 0, swaps land
on the timeline, and the telemetry-token form works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import require
from procs import (ROOT, Proc, free_port, get, jano_config, post_json, source_env,
                   start_fake_backend, start_jano, twistd_argv, wait_until)

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
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: check(d), message=what)


def _rows(driver: Any) -> list[Any]:
    return list(driver.find_elements("css selector", "#requests tbody tr[data-testid=request-row]"))


def _screenshot(driver: Any) -> None:
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, height)
    chrome = height - int(driver.execute_script("return window.innerHeight"))
    driver.set_window_size(1280, min(height + chrome, 2400))
    driver.execute_script("window.dispatchEvent(new Event('resize'))")
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    driver.save_screenshot(str(out / "dashboard.png"))
    if os.environ.get("JANO_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(out / "dashboard.png", ROOT / "docs" / "dashboard.png")


def test_dashboard_shows_the_demo_box_live(tmp_path: Path, browser: Any) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    popen = subprocess.Popen([*twistd_argv(), "-n", "--pidfile=", "-l", str(log), "jano", "--demo",
                              "--listen", f"tcp:{port}:interface=127.0.0.1"],
                             env=source_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    jano = Proc(popen, port, log)
    try:
        wait_until(lambda: get(jano.url + "/health")[0] == 200, 20, "demo", jano)
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
        rows = [r.get_attribute("textContent") for r in _rows(browser)]
        assert "demo-coder" in rows[0] and "200" in rows[0] and "completed" in rows[0]
        assert "demo-chat" in rows[-1] and "stream" in rows[-1]
        swaps = browser.find_elements("css selector", "#swap-list li[data-result=ok]")
        assert "demo-chat → demo-coder" in swaps[0].get_attribute("textContent")
        assert not browser.find_element("id", "thrash-warning").is_displayed()
        _screenshot(browser)

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
        # always_on models belong to no swap group: listed with their health, never "loaded"
        assert _text(browser, "#models tbody tr[data-model=m] th") == "m"
    finally:
        if jano is not None:
            jano.stop()
        backend.stop()
