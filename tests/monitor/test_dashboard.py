"""The gateway's /dashboard in headless Chromium (Debian's chromium): the page renders and shows the run with its
loss curve, the registry version with its eval table and champion alias, live serving stats and the A/B variants
with preference rates; the screenshot is a real rendering (many colours, not blank)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from tests.monitor.conftest import ServedLoop, system_tool

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium(url: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [system_tool("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dashboard_renders_runs_registry_serving_and_ab(served_loop: ServedLoop, tmp_path: Path) -> None:
    data = httpx.get(f"{served_loop.url}/dashboard/data.json", timeout=30).json()
    assert data["runs"][0]["run_id"] == served_loop.run_id and len(data["runs"][0]["loss_curve"]) >= 3
    version = data["versions"][0]
    assert version["aliases"] == ["champion"] and set(version["metrics"]) == {"tuned", "base"}
    assert sum(row["requests"] for row in data["serving"]) == 12
    variants = {row["variant"]: row for row in data["variants"]}
    assert sum(row["responses"] for row in variants.values()) == 12
    rated = [row for row in variants.values() if row["ratings"]]
    assert rated and all(0 <= row["preference_rate"] <= 1 for row in rated)

    dom = chromium(f"{served_loop.url}/dashboard", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for expected in (
        "tuneloop dashboard",
        served_loop.run_id,
        f"tiny-loop/{served_loop.version}",
        "champion",
        "gates pass",
        "perplexity",
        "Live serving",
        "tiny-loop@champion",
        "preference rate",
        "<polyline",  # the loss curve
    ):
        assert expected in html, expected

    screenshot = tmp_path / "dashboard.png"
    shot = chromium(
        f"{served_loop.url}/dashboard", tmp_path / "profile2", f"--screenshot={screenshot}", "--window-size=1280,1600"
    )
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    from PIL import Image

    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 1600)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    # The loss curve's blue (#2563eb) and the champion badge's green (#16a34a) are on the page.
    pixels = {colour for _, colour in colours}
    assert (0x25, 0x63, 0xEB) in pixels and (0x16, 0xA3, 0x4A) in pixels
