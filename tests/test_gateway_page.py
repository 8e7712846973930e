"""The tenants' web page (`/ui/`), as a tenant meets it: Debian's Chromium, headless, driven through Debian's
chromedriver by selenium, on a real `lorafleet gateway` process and Valkey (test_gateway's `gateway` fixture).

The job the page watches is moved by the store's own verbs, the executor's write path (`claim`, `start`,
`record_progress`, `record_checkpoint`, `succeed`), while the browser is open: the page learns of each step only by
polling the API. Skipped when the machine has no Chromium (`apt-get install chromium chromium-driver`; .ci/run does).
LORAFLEET_SCREENSHOT=<path> also writes the live test's screenshot there (the README's docs/tenant-page.png)."""

from __future__ import annotations

import os
import secrets
import shutil
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from helpers_polling import wait_until
from lorafleet.gateway.page import CONTENT_SECURITY_POLICY
from lorafleet.scheduler.generation import (
    ChoiceResult, GenerationResult, Generations, ServingBudget, checkpoint_model_name, fine_tuned_model_name,
)
from lorafleet.scheduler.records import FailureReason
from test_gateway import client, create, gateway  # noqa: F401  (gateway: the fixture, a real gateway process)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless on a machine without outside network: no sandbox (root in a container), no GPU, and none of the
# background fetches (updates, sync, QUIC probes) that would wait on a closed network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,1500")
TOTAL_STEPS = 12
EXECUTOR = "page-exec"
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh profile, driven by chromedriver (both Debian's: nothing downloaded)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.skip(f"no Chromium to drive ({', '.join(missing)} missing): apt-get install chromium chromium-driver")
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser, gateway: str) -> None:
    """The page at `/`, in a tab that holds no token (each test logs in afresh)."""
    browser.get(gateway + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_until(lambda: browser.find_element(By.ID, "login-view").is_displayed(), "the login form", timeout=15)


def log_in(browser, token: str) -> None:
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()


def shown(browser, css: str) -> int:
    """How many elements matching `css` are displayed."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).filter(n => n.checkVisibility()).length", css)


# The page re-renders what it polls (every second): an element found by one WebDriver call can be replaced before
# the next call reads it (StaleElementReferenceException). So the tests read the page in one script call each.
def texts(browser, css: str) -> list[str]:
    """The rendered text of each element matching `css`, read in one call."""
    return browser.execute_script("return Array.from(document.querySelectorAll(arguments[0]), n => n.innerText)", css)


def text_of(browser, css: str) -> str:
    """The rendered text of the first element matching `css`, '' when there is none."""
    return next(iter(texts(browser, css)), "")


def click(browser, css: str) -> None:
    assert browser.execute_script("const n = document.querySelector(arguments[0]); n && n.click(); return !!n", css)


def csp_violations(browser) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]


class Executor:
    """Moves one job through the store as an executor does (the page's only source is the gateway's API)."""

    def __init__(self, store, job_id: str):
        self.store, self.job_id = store, job_id
        self.attempt = store.claim(job_id, EXECUTOR)
        assert self.attempt is not None and store.start(job_id, self.attempt, EXECUTOR)

    def steps(self, steps: range, validate_at: tuple[int, ...] = ()) -> None:
        for step in steps:
            metrics = {"loss": 3.0 * 0.85 ** step, "lr": 2e-4}
            if step in validate_at:
                metrics["eval_loss"] = 3.2 * 0.88 ** step
            assert self.store.record_progress(self.job_id, step, TOTAL_STEPS, metrics, attempt=self.attempt,
                                              executor_id=EXECUTOR)

    def checkpoint(self, step: int) -> None:
        uri = f"/artifacts/{self.job_id}/checkpoint-{step}-{secrets.token_hex(4)}"
        assert self.store.record_checkpoint(self.job_id, uri, self.attempt, EXECUTOR, step=step) is not None

    def succeed(self) -> None:
        assert self.store.succeed(self.job_id, f"/artifacts/{self.job_id}/adapter", self.attempt, EXECUTOR)


def chart_points(browser) -> tuple[int, int]:
    """(train, validation) points drawn in the job page's SVG chart."""
    return tuple(browser.execute_script("return [document.querySelectorAll('#chart svg circle.point.train').length, "
                                        "document.querySelectorAll('#chart svg circle.point.valid').length]"))


def test_a_running_jobs_loss_curve_grows_in_the_browser_as_its_executor_reports_steps(
        browser, gateway, make_tenant, store, tmp_path):
    tenant = make_tenant()
    job = create(client(gateway, tenant.token), tenant.dataset, validation_file=tenant.dataset, suffix="support-bot",
                 metadata={"team": "search"})
    executor = Executor(store, job.id)
    executor.steps(range(1, 4), validate_at=(3,))

    open_page(browser, gateway)
    log_in(browser, tenant.token)
    link = f'#jobs a[href="#/jobs/{job.id}"]'
    wait_until(lambda: shown(browser, link), "the job in the list", timeout=15)
    row = browser.execute_script("return document.querySelector(arguments[0]).closest('tr').innerText", link)
    assert "running" in row and "support-bot" in row and "3/12" in row, row
    click(browser, link)
    wait_until(lambda: chart_points(browser) == (3, 1), "3 train and 1 validation points", timeout=15,
               details=lambda: str(chart_points(browser)))

    executor.steps(range(4, 7), validate_at=(6,))
    executor.checkpoint(6)
    wait_until(lambda: chart_points(browser) == (6, 2), "the curve to grow to 6 train and 2 validation points",
               timeout=15, details=lambda: str(chart_points(browser)))
    points = browser.execute_script("return document.querySelector('#chart polyline.train').getAttribute('points')")
    assert len(points.split()) == 6, points
    wait_until(lambda: "Checkpoint at step 6" in text_of(browser, "#downloads"), "the checkpoint listed", timeout=15)
    events = texts(browser, "#events li")
    assert any(f"Step 6/{TOTAL_STEPS}: training loss={3.0 * 0.85 ** 6:.4f}" in event for event in events), events
    assert any("Job running" in event for event in events) and any("Checkpoint saved at step 6" in e for e in events)

    screenshot = tmp_path / "tenant-page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("LORAFLEET_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["LORAFLEET_SCREENSHOT"])

    executor.steps(range(7, TOTAL_STEPS + 1))
    executor.succeed()
    wait_until(lambda: "succeeded" in text_of(browser, "#job-details .status"),
               "the page to show the job succeeded", timeout=15)
    assert chart_points(browser) == (TOTAL_STEPS, 2)
    assert browser.get_cookies() == [] and tenant.token not in browser.current_url, "the token is in no cookie or URL"
    assert browser.execute_script("return sessionStorage.getItem('lorafleet.token')") == tenant.token
    assert csp_violations(browser) == []


def test_a_wrong_token_shows_an_error_on_the_login_form(browser, gateway):
    open_page(browser, gateway)
    log_in(browser, "lft_not-a-token")
    wait_until(lambda: shown(browser, "#error"), "an error message", timeout=15)
    error = text_of(browser, "#error")
    assert "token was refused" in error and "invalid token" in error, error
    assert browser.find_element(By.ID, "login-view").is_displayed()
    assert not browser.find_element(By.ID, "jobs-view").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('lorafleet.token')") is None


def test_tenant_text_from_the_api_is_shown_as_text_never_run_as_html(browser, gateway, make_tenant, store):
    tenant = make_tenant()
    job = create(client(gateway, tenant.token), tenant.dataset, metadata={"title": HOSTILE})
    assert store.fail(job.id, "queued", f"bad data: {HOSTILE}", reason=FailureReason.TRAINING)

    open_page(browser, gateway)
    title = browser.title
    log_in(browser, tenant.token)
    wait_until(lambda: shown(browser, f'#jobs a[href="#/jobs/{job.id}"]'), "the job in the list", timeout=15)
    assert f"title={HOSTILE}" in text_of(browser, "#jobs .metadata")
    browser.get(f"{gateway}/ui/#/jobs/{job.id}")
    wait_until(lambda: shown(browser, "#job-details .error-text"), "the job's error", timeout=15)
    assert text_of(browser, "#job-details .error-text") == f"bad data: {HOSTILE}"
    wait_until(lambda: any(HOSTILE in item for item in texts(browser, "#events li")),
               "the error event, as text", timeout=15)
    assert browser.execute_script("return document.querySelectorAll('main script, main img').length") == 0
    assert browser.title == title != "pwned"
    assert csp_violations(browser) == []


def test_the_page_is_served_with_a_content_security_policy_that_allows_only_its_own_script(gateway):
    with urllib.request.urlopen(gateway + "/", timeout=5) as response:  # follows the redirect to ui/
        assert response.url == gateway + "/ui/" and b'<script src="app.js"' in response.read()
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "default-src 'none'" in CONTENT_SECURITY_POLICY
    with urllib.request.urlopen(gateway + "/ui/app.js", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/javascript")
        assert ".innerHTML" not in response.read().decode(), "the script builds nodes from text, never HTML"
    schema = urllib.request.urlopen(gateway + "/openapi.json", timeout=5).read().decode()
    assert '"/ui/' not in schema, "the page is not part of the API's schema"


def test_a_succeeded_jobs_model_completes_a_prompt_on_the_page_as_the_executor_streams_it(
        browser, gateway, make_tenant, store, hf_cache, base_model_dir):
    tenant = make_tenant()
    job = create(client(gateway, tenant.token), tenant.dataset, suffix="try-bot")
    executor = Executor(store, job.id)
    executor.steps(range(1, 4))
    executor.checkpoint(3)
    executor.succeed()
    record = store.job(job.id)
    generations = Generations(store, hf_cache, [base_model_dir.parent.parent])

    open_page(browser, gateway)
    log_in(browser, tenant.token)
    wait_until(lambda: shown(browser, "#jobs-view"), "the job list", timeout=15)
    browser.get(f"{gateway}/ui/#/jobs/{job.id}")
    wait_until(lambda: shown(browser, "#try-part"), "the try-it form", timeout=15)
    options = browser.execute_script("return Array.from(document.querySelectorAll('#try-model option'), o => o.value)")
    assert options == [fine_tuned_model_name(record), checkpoint_model_name(record, 3)]
    browser.execute_script("document.getElementById('try-prompt').value = arguments[0]", "Say hi")
    click(browser, "#try-form button")

    def ours() -> list:  # the executor's side: take the page's request (other tests' expired ones are dropped)
        return [r for r in generations.take_requests(record.plan.compat_key, ServingBudget(max_requests=8,
                                                                                          max_tokens=4096))
                if r.tenant == tenant.name]

    request = wait_until(ours, "the page's request in the base's queue", timeout=15)[0]
    assert (request.prompt, request.stream, request.sampling.max_tokens, request.target.model) == (
        "Say hi", True, 64, fine_tuned_model_name(record))
    generations.publish_text([(request, 0, "Hello ")])
    wait_until(lambda: text_of(browser, "#try-output .completion") == "Hello ", "the first text", timeout=15)
    assert "generating" in text_of(browser, "#try-output")
    generations.deliver(request, GenerationResult(request_id=request.request_id, prompt_tokens=3, choices=(
        ChoiceResult(text="Hello " + HOSTILE, completion_tokens=9, finish_reason="length"),)), unsent=[HOSTILE])
    wait_until(lambda: "stopped at max tokens" in text_of(browser, "#try-output"), "the end of the answer",
               timeout=15, details=lambda: text_of(browser, "#try-output"))
    assert text_of(browser, "#try-output .completion") == "Hello " + HOSTILE
    assert browser.execute_script("return document.querySelectorAll('main script, main img').length") == 0

    click(browser, "#try-form button")  # a request the executor fails: its reason is shown
    request = wait_until(ours, "the second request", timeout=15)[0]
    generations.deliver(request, GenerationResult(request_id=request.request_id, error="the prompt is too long"))
    wait_until(lambda: "the prompt is too long" in text_of(browser, "#try-output .error-text"), "the error shown",
               timeout=15, details=lambda: text_of(browser, "#try-output"))
    assert csp_violations(browser) == []
