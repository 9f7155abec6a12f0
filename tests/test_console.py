"""The web console (`loramux serve` at /) in Debian's Chromium through Playwright, against a live
server on the tiny model with an API key: the auth prompt (a wrong key is told so), the models
panel against /v1/models, a fine-tuning job started from the page whose loss chart gains points,
a streamed answer in the playground, and the README's screenshots (docs/images/console-*.png).

Every page load is watched: a console error, a page error, a failed request or a response of 400
or more fails the test, except the 401 of the deliberate wrong-key check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: the console tests need Debian's chromium (apt-get install chromium; "
                ".ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the console tests need playwright (pip install '.[test]')")

import torch
from live_server import KEY, Server, tiny_model_dir

from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
TIMEOUT = 120_000  # ms: Playwright's waits on conditions, on 2 busy cores
sync_api.expect.set_options(timeout=TIMEOUT)
TRAINING = "".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}) + "\n"
                   for w in ("yes", "no", "maybe", "always", "never", "sometimes")).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    model = tiny_model_dir(root / "tiny")
    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    poet = LoraAdapter.create("poet", LoraConfig(r=4, target_modules=("q_proj", "v_proj")), config,
                              generator=torch.Generator().manual_seed(0), init_b="random")
    save_peft_adapter(poet, root / "adapters" / "poet")
    srv = Server(root / "data", "--model", str(model), "--api-key", KEY, "--adapter", f"poet={root / 'adapters' / 'poet'}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


class Watch:
    """What went wrong on a page: console errors, page errors, failed requests, responses >= 400
    (but for 401s while `expect_401` is set), and every URL requested (to check the key is in none)."""

    def __init__(self, page) -> None:
        self.problems: list[str] = []
        self.urls: list[str] = []
        self.expect_401 = False
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.method} {r.url} {r.failure}"))
        page.on("response", self._response)

    def _console(self, message) -> None:
        if message.type == "error" and not (self.expect_401 and "401" in message.text):
            self.problems.append(f"console: {message.text}")

    def _response(self, response) -> None:
        if response.status >= 400 and not (self.expect_401 and response.status == 401):
            self.problems.append(f"response: {response.status} {response.request.method} {response.url}")


def open_console(browser, server, viewport: dict):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    return context, page, Watch(page)


def sign_in(page, key: str = KEY) -> None:
    dialog = page.get_by_role("dialog", name="API key")
    dialog.get_by_label("API key").fill(key)
    dialog.get_by_role("button", name="Connect").click()


@pytest.fixture(scope="module")
def console(browser, server):
    """One desktop page through the module's tests, signed in by the first."""
    context, page, watch = open_console(browser, server, {"width": 1280, "height": 900})
    page.goto(server.url + "/")
    yield page, watch
    context.close()


def test_the_key_is_asked_for_once_and_a_wrong_one_is_told_so(console, server):
    page, watch = console
    dialog = page.get_by_role("dialog", name="API key")
    sync_api.expect(dialog).to_be_visible()
    watch.expect_401 = True
    sign_in(page, "not-the-key")
    sync_api.expect(page.locator("#auth-message")).to_have_text("Wrong API key: the server refused it.")
    watch.expect_401 = False
    sign_in(page)
    sync_api.expect(dialog).to_be_hidden()
    sync_api.expect(page.locator("#connection")).to_contain_text("base model tiny")
    assert page.evaluate("sessionStorage.getItem('loramux.apiKey')") == KEY
    page.reload()  # kept for the tab: not asked again
    sync_api.expect(page.locator("#connection")).to_contain_text("base model tiny")
    sync_api.expect(dialog).to_be_hidden()
    assert not [u for u in watch.urls if KEY in u or "not-the-key" in u]
    assert watch.problems == []


def test_the_models_panel_lists_what_the_api_lists(console, server):
    page, watch = console
    listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    ids = sorted(m["id"] for m in listed)
    assert "poet" in ids
    rows = page.locator("#models-table tbody tr")
    sync_api.expect(rows).to_have_count(len(ids))
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.modelId)")) == ids
    sync_api.expect(page.locator('#models-table tr[data-model-id="poet"]')).to_contain_text("resident")
    assert watch.problems == []


def test_a_job_started_from_the_page_runs_and_its_loss_chart_gains_points(console, server):
    page, watch = console
    page.locator("#new-job summary").click()
    form = page.locator("#job-form")
    form.get_by_label("Training file (JSONL)").set_input_files({"name": "train.jsonl", "mimeType": "application/jsonl",
                                                                "buffer": TRAINING})
    form.get_by_label("Validation file (optional)").set_input_files({"name": "val.jsonl", "mimeType": "application/jsonl",
                                                                     "buffer": TRAINING})
    form.get_by_label("Suffix").fill("console")
    form.get_by_label("Batch size").fill("2")
    form.get_by_label("LoRA rank").fill("4")
    form.get_by_label("Max steps").fill("400")
    form.get_by_label("Evaluate every (steps)").fill("4")
    form.get_by_role("button", name="Upload and start").click()
    sync_api.expect(page.locator("#job-message")).to_contain_text("Started ftjob-")
    job_id = page.locator("#job-message").inner_text().removeprefix("Started ").rstrip(".")

    sync_api.expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')).to_contain_text("running")
    sync_api.expect(page.locator("#job-title")).to_have_text(f"Job {job_id}")
    chart = page.locator("#loss-chart")
    page.wait_for_function("() => Number(document.querySelector('#loss-chart').dataset.points) >= 2")
    first = int(chart.get_attribute("data-points"))
    page.wait_for_function(f"() => Number(document.querySelector('#loss-chart').dataset.points) > {first}")
    sync_api.expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"] td.progress')).to_contain_text(" / 400")

    job = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert job["status"] == "running" and job["hyperparameters"]["batch_size"] == 2 and job["lora"]["r"] == 4

    # pause and resume from the page reach the job (its status, as the API reports it)
    detail = page.locator("#job-detail")
    detail.get_by_role("button", name="Pause").click()
    sync_api.expect(page.locator("#job-message")).to_have_text("Paused.")
    sync_api.expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')).to_contain_text("paused")
    assert httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()["status"] == "paused"
    sync_api.expect(detail.get_by_role("button", name="Pause")).to_be_hidden()
    detail.get_by_role("button", name="Resume").click()
    sync_api.expect(page.locator("#job-message")).to_have_text("Resumed.")
    sync_api.expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')).to_contain_text("running")
    assert watch.problems == []


def test_the_playground_streams_an_answer(console, server):
    page, watch = console
    form = page.locator("#chat-form")
    form.get_by_label("Model A").select_option("tiny")
    form.get_by_label("Model B").select_option("poet")
    form.get_by_label("Temperature").fill("0")
    form.get_by_label("Max tokens").fill("24")
    form.get_by_label("Message").fill("Write a line about rain.")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as streamed:
        form.get_by_role("button", name="Send").click()
    assert streamed.value.headers["content-type"].startswith("text/event-stream")
    for model in ("tiny", "poet"):
        answer = page.locator(f'.transcript[data-model="{model}"] li.assistant[data-done="yes"]')
        sync_api.expect(answer).to_have_count(1)
        assert answer.inner_text().strip() and "error" not in answer.inner_text()
    assert watch.problems == []


def test_the_serving_panel_charts_the_stats_endpoint(console, server):
    page, watch = console
    page.wait_for_function("() => Number(document.querySelector('#serving-summary').dataset.requests) >= 2")
    stats = httpx.get(f"{server.url}/v1/loramux/stats", params={"window": 300, "interval": 5},
                      headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["targets"] == {"ttft": 2.0, "tpot": 0.25} and len(stats["time"]) == 60
    assert stats["totals"]["requests"] >= 2 and max(stats["requests_per_second"]) > 0
    assert any(v is not None for v in stats["ttft"]["p50"]) and any(v is not None for v in stats["slo_attainment"])
    assert max(stats["rows_per_second"]["train"]) > 0 and max(stats["rows_per_second"]["decode"]) > 0
    assert max(v or 0 for v in stats["kv_cache_usage"]) > 0
    for name in ("rps", "ttft", "tpot", "slo", "kv", "rows"):
        assert page.locator(f'[data-chart="{name}"]').get_attribute("data-points") == "60"
    assert watch.problems == []


def test_screenshots_at_desktop_and_phone_width(console, browser, server):
    page, watch = console
    page.evaluate("window.scrollTo(0, 0)")
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=IMAGES / "console-desktop.png")
    assert watch.problems == []

    context, phone, phone_watch = open_console(browser, server, {"width": 390, "height": 844})
    try:
        phone.goto(server.url + "/")
        sign_in(phone)
        sync_api.expect(phone.locator("#models-table tbody tr")).not_to_have_count(0)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        phone.screenshot(path=IMAGES / "console-phone.png")
        assert phone_watch.problems == []
    finally:
        context.close()
    for name in ("console-desktop.png", "console-phone.png"):
        assert (IMAGES / name).stat().st_size < 400_000


def test_without_a_key_nothing_is_asked_and_an_unreachable_server_is_told(browser, tmp_path):
    srv = Server(tmp_path / "data", "--model", str(tiny_model_dir(tmp_path / "tiny")))
    context, page, watch = open_console(browser, srv, {"width": 1280, "height": 900})
    try:
        page.goto(srv.url + "/")
        sync_api.expect(page.locator("#connection")).to_contain_text("base model tiny")
        sync_api.expect(page.get_by_role("dialog", name="API key")).to_be_hidden()
        sync_api.expect(page.get_by_role("button", name="Forget API key")).to_be_hidden()
        assert watch.problems == []
        srv.stop()
        sync_api.expect(page.locator("#unreachable")).to_have_text(
            f"Cannot reach the loramux server at {srv.url}. Is it running? Retrying…")
        sync_api.expect(page.locator("#connection")).to_have_text("Disconnected")
        assert not [p for p in watch.problems if p.startswith("page error")]
    finally:
        context.close()
        srv.stop()
