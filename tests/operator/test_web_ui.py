"""The web view in headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium through /usr/bin/chromedriver: nothing is downloaded) against the real coordinator
of conftest.py: login, the jobs list, a finished job's charts (point counts checked against
the API), the fleet, live updates while a job runs, and the session guard.

Screenshots go to the test's tmp dir, or to $FEDHL_UI_SCREENSHOTS (the README's come from
`FEDHL_UI_SCREENSHOTS=docs/img pytest tests/operator/test_web_ui.py`)."""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import AGENTS, ROUNDS, Stack, rounds_of, run_cli, submit_reviews

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1360,900",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver", pytrace=False)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("FEDHL_UI_SCREENSHOTS")
    out = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = check()
        except Exception:  # the page is mid-render: elements come and go
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def login(driver: Any, stack: Stack, token: str) -> None:
    css(driver, "#token")[0].send_keys(token)
    css(driver, "#login")[0].click()


def screenshot(driver: Any, path: Path) -> None:
    """The whole page, below the fold too (Chrome DevTools' capture, not the window's)."""
    width, height = driver.execute_script(
        "const d = document.documentElement;"
        "return [d.clientWidth, Math.max(d.scrollHeight, document.body.scrollHeight)]"
    )
    clip = {"x": 0, "y": 0, "width": int(width), "height": min(int(height), 6000), "scale": 1}
    args = {"format": "png", "captureBeyondViewport": True, "clip": clip}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", args)
    path.write_bytes(base64.b64decode(shot["data"]))


def test_login_then_jobs_list(browser: Any, stack: Stack) -> None:
    # Execute: an unauthenticated visit lands on the login form; a wrong token is refused
    browser.get(f"{stack.url}/ui/jobs/{stack.job_id}")
    assert "/ui/login" in browser.current_url
    login(browser, stack, "not-the-token")
    wait_for("the refusal", lambda: "not the admin token" in css(browser, ".error")[0].text)
    login(browser, stack, stack.token)
    # Assert: back on the page asked for, then the jobs list links to the job
    wait_for("the job page", lambda: browser.current_url.endswith(f"/ui/jobs/{stack.job_id}"))
    browser.get(f"{stack.url}/ui")
    rows = wait_for("the jobs table", lambda: css(browser, "#jobs-table tbody tr"))
    assert any(stack.job_id in r.text and "COMPLETED" in r.text for r in rows)


def test_job_page_charts_have_a_point_per_round_and_agent(browser: Any, stack: Stack, shots: Path) -> None:
    # Prepare: what the API says about the finished job
    committed = [r for r in rounds_of(stack, stack.job_id) if r["state"] == "COMMITTED"]
    assert len(committed) == ROUNDS
    ranks_seen = {rank for r in committed for rank in r["report"]["energy_kept"]}
    # Execute
    browser.get(f"{stack.url}/ui/jobs/{stack.job_id}")
    wait_for("the rounds table", lambda: len(css(browser, "#rounds-table tbody tr")) == ROUNDS)

    def points(chart: str) -> int:
        return len(css(browser, f'[data-chart="{chart}"] circle.pt'))

    # Assert: one point per round, per agent or per rank, as the reports hold them
    assert points("accuracy") == ROUNDS
    assert points("loss") == ROUNDS
    assert points("neff") == ROUNDS
    assert points("weights") == ROUNDS * len(AGENTS)
    assert points("ranks") == ROUNDS * len(AGENTS)
    assert points("energy") == ROUNDS * len(ranks_seen)
    drop_series = 3 if any("dropped" in r["report"] or "clipped" in r["report"] for r in committed) else 1
    assert points("drops") == ROUNDS * drop_series  # expired assignments (+ dropped, clipped when reported)
    legend = {e.text for e in css(browser, '[data-chart="weights"] .legend text')}
    assert legend == {name for name, _, _ in AGENTS}
    rank_titles = [e.get_attribute("textContent") for e in css(browser, '[data-chart="ranks"] circle.pt title')]
    assert {t.split(": ")[-1] for t in rank_titles} == {"4", "8", "16"}  # fixed ranks of reviews.yaml
    first = committed[0]["report"]["evaluation"]["accuracy"]
    acc_titles = [e.get_attribute("textContent") for e in css(browser, '[data-chart="accuracy"] circle.pt title')]
    assert f"round 1: {first:.4f}" in " ".join(acc_titles)
    screenshot(browser, shots / "ui-job.png")


def test_fleet_lists_the_agents(browser: Any, stack: Stack, shots: Path) -> None:
    browser.get(f"{stack.url}/ui/fleet")
    rows = wait_for("the fleet table", lambda: css(browser, "#fleet-table tbody tr"))
    text = {r.text.split("\n")[0].split(" ")[0]: r.text for r in rows}
    assert set(text) >= {name for name, _, _ in AGENTS}
    assert "NVIDIA L4" in text["agent-1"] and "24.0 GiB" in text["agent-1"]
    assert "alive" in text["agent-2"]
    assert re.search(r" 16 \(\w+, round \d\) ", text["agent-3"])  # its rank in the latest round (reviews.yaml: 16)
    screenshot(browser, shots / "ui-fleet.png")


def test_job_page_updates_while_the_job_runs(browser: Any, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a second job, opened in the browser as soon as it exists
    code, out, _ = run_cli(submit_reviews(stack.overrides, "rounds=2", "name=live"), capsys)
    assert code == 0
    job_id = out.strip()
    browser.get(f"{stack.url}/ui/jobs/{job_id}")
    wait_for("the job page", lambda: css(browser, "h1") and css(browser, "h1")[0].text == "live")
    browser.execute_script("window.__sameDocument = true")
    # Execute / Assert: the page redraws itself (no reload) until both rounds are in
    wait_for("two committed rounds", lambda: len(css(browser, '[data-chart="neff"] circle.pt')) == 2, timeout=120)
    assert browser.execute_script("return window.__sameDocument === true")
    assert int(css(browser, "body")[0].get_attribute("data-renders")) > 1


def test_agent_names_are_shown_as_text(browser: Any, stack: Stack) -> None:
    # Prepare: an agent whose name is markup (agents pick their names)
    from fedhl.agent.scripted import ScriptedAgent

    token = stack.http.post("/agents/enrolment-tokens", json={"label": "xss"}).raise_for_status().json()["token"]
    name = '<img src=x id=injected onerror="document.title=1">'
    agent = ScriptedAgent(f"127.0.0.1:{stack.proc.settings.grpc_port}", token, name)
    agent.close()
    stack.http.post(f"/agents/{agent.agent_id}/revoke").raise_for_status()  # listed, never selected
    # Execute
    browser.get(f"{stack.url}/ui/fleet")
    rows = wait_for("the fleet table", lambda: [r for r in css(browser, "#fleet-table tbody tr") if "<img" in r.text])
    # Assert
    assert name in rows[0].text
    assert css(browser, "#injected") == []


def test_nothing_under_ui_answers_without_a_session(stack: Stack) -> None:
    anon = httpx.Client(base_url=stack.url, follow_redirects=False)
    forged = httpx.Client(base_url=stack.url, cookies={"fedhl_ui": "9999999999.forged"})
    for path in ("/ui", f"/ui/jobs/{stack.job_id}", "/ui/fleet"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login"), path
    for path in ("/ui/api/jobs", f"/ui/api/jobs/{stack.job_id}/rounds", "/ui/api/agents"):
        assert anon.get(path).status_code == 401, path
        assert forged.get(path).status_code == 401, path
        # the bearer token of the API is not a session: the page never holds it
        assert anon.get(path, headers={"Authorization": f"Bearer {stack.token}"}).status_code == 401, path
    # write routes are not mounted under the session at all
    session = anon.post("/ui/login", data={"token": stack.token})
    assert session.status_code == 303
    set_cookie = session.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/ui" in set_cookie
    authed = httpx.Client(base_url=stack.url, cookies={"fedhl_ui": session.cookies["fedhl_ui"]})
    assert authed.get("/ui/api/jobs").status_code == 200
    assert authed.post(f"/ui/api/jobs/{stack.job_id}/cancel").status_code in (404, 405)
    assert stack.http.get(f"/jobs/{stack.job_id}").json()["status"] == "COMPLETED"
    # an off-site `next` is ignored
    r = anon.post("/ui/login?next=//evil.example/ui", data={"token": stack.token})
    assert r.headers["location"] == "/ui"
    assert anon.get("/ui/static/app.js").status_code == 200  # code, not data: the login page needs it
    assert anon.get("/ui/static/../../settings.py").status_code == 404
