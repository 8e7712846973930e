"""The job page's Samples section (issue 18) in headless Chromium, on a real gateway process and Valkey
(tests/test_gateway_page.py's browser and helpers): each checkpoint's eval_samples event, newest first, each prompt
and its completion, shown as text."""

from __future__ import annotations

from selenium.webdriver.common.by import By

from helpers_polling import wait_until
from lorafleet.scheduler import eval_samples
from lorafleet.scheduler.eval_samples import EvalSample
from test_gateway import SMALL, client, create, gateway  # noqa: F401  (gateway: the fixture)
from test_gateway_page import HOSTILE, Executor, browser, csp_violations, log_in, open_page, text_of  # noqa: F401

PROMPTS = ["What is two plus two?", "Name a colour."]


def sample_sets(browser) -> list[tuple[str, list[tuple[str, str]]]]:
    """(heading, [(prompt, completion), ...]) of each block of the Samples section, top first, read in one call
    (the page re-renders what it polls)."""
    sets = browser.execute_script("""
        return Array.from(document.querySelectorAll('#samples .sample-set'), block => [
            block.querySelector('h3').innerText,
            Array.from(block.querySelectorAll('li'), item => [item.querySelector('.prompt').innerText,
                                                               item.querySelector('.completion').textContent])])""")
    return [(heading, [tuple(item) for item in items]) for heading, items in sets]


def test_the_job_page_shows_each_checkpoints_samples_newest_first_as_text(browser, gateway, make_tenant, store):
    tenant = make_tenant()
    job = create(client(gateway, tenant.token), tenant.dataset,
                 extra_body={"lorafleet": {**SMALL, "eval_samples": PROMPTS}})
    executor = Executor(store, job.id)
    executor.steps(range(1, 5))
    store.append_event(job.id, eval_samples.EVENT, **eval_samples.event_data(4, [
        EvalSample(PROMPTS[0], "five", "stop"), EvalSample(PROMPTS[1], HOSTILE, "length")]))

    open_page(browser, gateway)
    log_in(browser, tenant.token)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#jobs-view a"), "the job list", timeout=15)
    browser.get(f"{gateway}/ui/#/jobs/{job.id}")
    wait_until(lambda: len(sample_sets(browser)) == 1, "the step 4 samples", timeout=15)
    assert browser.find_element(By.ID, "samples-part").is_displayed()

    executor.steps(range(5, 9))
    store.append_event(job.id, eval_samples.EVENT, **eval_samples.event_data(8, [
        EvalSample(PROMPTS[0], "four", "stop"), EvalSample(PROMPTS[1], "blue", "stop")]))
    wait_until(lambda: len(sample_sets(browser)) == 2, "the step 8 samples to arrive while the page polls",
               timeout=15)
    (newest, newest_items), (older, older_items) = sample_sets(browser)
    assert newest.startswith("Step 8") and older.startswith("Step 4"), (newest, older)
    assert newest_items == [(PROMPTS[0], "four"), (PROMPTS[1], "blue")]
    assert older_items == [(PROMPTS[0], "five"), (PROMPTS[1], HOSTILE)], "tenant text is shown as text"
    assert browser.execute_script("return document.querySelectorAll('main script, main img').length") == 0

    store.append_event(job.id, eval_samples.EVENT, **eval_samples.event_data(12, error="RuntimeError: no pages"))
    wait_until(lambda: "No samples: RuntimeError: no pages" in text_of(browser, "#samples"),
               "the failed samples' reason", timeout=15)
    assert csp_violations(browser) == []


def test_a_job_without_eval_samples_shows_no_samples_section(browser, gateway, make_tenant, store):
    tenant = make_tenant()
    job = create(client(gateway, tenant.token), tenant.dataset)
    Executor(store, job.id).steps(range(1, 3))
    open_page(browser, gateway)
    log_in(browser, tenant.token)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#jobs-view a"), "the job list", timeout=15)
    browser.get(f"{gateway}/ui/#/jobs/{job.id}")
    wait_until(lambda: "2/12" in text_of(browser, "#job-details"), "the job's details", timeout=15)
    assert not browser.find_element(By.ID, "samples-part").is_displayed()
