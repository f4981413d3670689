"""The coordinator's dashboard in headless Chromium, open on a live run of two peers."""

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from coordinator.harness import headless_chromium

PEERS = ("ada", "grace")


@pytest.fixture
def browser() -> Iterator[Browser]:
    with headless_chromium() as browser:
        yield browser


def figure(page: Page, selector: str) -> float:
    return float(page.locator(selector).inner_text().replace(",", ""))


def save_screenshot(page: Page, path: Path) -> None:
    """Into the test's folder and, when STARLING_TEST_ARTIFACTS names a folder, there too."""
    page.screenshot(path=path, full_page=True)
    artifacts = os.environ.get("STARLING_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)


def test_dashboard_follows_a_live_run(
    tmp_path, write_run_config, coordinator, launch_peer, browser, write_prepared_text
):
    write_prepared_text(tmp_path / "held-out", 8)
    run_toml = write_run_config(tmp_path, target_batch_size=32, checkpoint_every=2)
    coord = coordinator(run_toml, "--eval-data", str(tmp_path / "held-out"))
    for name in PEERS:
        launch_peer(name, initial_peers=[coord.address], duration=240)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(coord.url)
    expect(page.locator("#run-id")).to_have_text(coord.state()["run_id"])
    expect(page.locator("#join-command")).to_contain_text(coord.address)
    rows = page.locator("#peers-table tbody tr[data-key]")
    expect(rows).to_have_count(len(PEERS), timeout=120_000)
    expect(page.locator("#active-peers")).to_have_text(str(len(PEERS)), timeout=30_000)
    expect(page.locator("#status")).to_have_text("training")
    assert sorted(rows.locator("td:first-child").all_inner_texts()) == sorted(PEERS)
    expect(rows.locator("td:nth-child(3)")).to_have_text(["fp32"] * len(PEERS))  # the precision on CPU
    expect(rows.locator("td:nth-child(5)")).to_have_text(["pretrain"] * len(PEERS))  # the objective
    # The history gains a point every 5 s and the page fetches it every 10 s.
    expect(page.locator("#loss-chart svg path.line")).to_have_count(1, timeout=60_000)
    expect(page.locator("#throughput-chart svg path.line")).to_have_count(1)
    expect(page.locator("#peers-chart svg path.line")).to_have_count(1)

    # Left open, the page follows the run.
    epoch = figure(page, "#epoch")
    page.wait_for_function(
        "epoch => Number(document.querySelector('#epoch').textContent.replace(/,/g, '')) > epoch",
        arg=epoch,
        timeout=60_000,
    )
    expect(page.locator("#leaderboard-table tbody tr")).to_have_count(len(PEERS))
    assert figure(page, "#samples-per-second") > 0 and figure(page, "#loss") > 0
    expect(page.locator("#checkpoint-epoch")).not_to_have_text("—", timeout=90_000)  # every 2 epochs
    # The held-out loss of the newest evaluated checkpoint (each one is evaluated once written).
    expect(page.locator("#checkpoint-evaluation")).to_have_text(
        re.compile(r"^\d+\.\d{3} \(perplexity \d+\.\d\) at epoch \d+$"), timeout=60_000
    )

    save_screenshot(page, tmp_path / "dashboard.png")
    assert errors == []
