"""The status page at `/`, rendered by a real browser (headless Chromium) against a real server: the DOM it
builds names the models and their states, and the screenshot shows the page (badge, memory bar), with every
other network address unreachable (a dead proxy), so nothing on the page comes from the network."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import StartServer
from tests.support.png import count_near, read_png

pytestmark = pytest.mark.slow

GREEN_BADGE = (0x16, 0xA3, 0x4A)  # .badge.ok
WEIGHTS_BLUE = (0x25, 0x63, 0xEB)  # the memory bar's weights part
PINNED_LABEL = (0xE0, 0xE7, 0xFF)  # the "pinned" tag's background


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium; tests/run.sh does it)")
    return path


def browse(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--proxy-server=http://127.0.0.1:9", "--no-first-run", "--disable-extensions", *args, url],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_status_page_renders_the_models_in_a_browser(
    start_server: StartServer, models_dir: Path, tmp_path: Path
) -> None:
    server = start_server("--models-dir", str(models_dir), "--pin-model", "org/tiny-two", "--keep-alive-s", "900")
    server.wait_ready()
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    assert httpx.post(server.base_url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    deadline = time.monotonic() + 30
    while len(server.health().json()["models"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a fresh heartbeat, so the page shows both as loaded

    dom = browse(server.base_url + "/", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "<h1>mlx-gateway" in text and 'class="badge ok"' in text
    rows = {row.split("<")[0].strip(): row.split("</tr>")[0] for row in text.split('<td class="id">')[1:]}
    assert set(rows) == {"tiny", "org/tiny-two"}
    assert "loaded" in rows["tiny"] and "in 15 min" in rows["tiny"]  # 900 s keep-alive, just used
    assert "never (pinned)" in rows["org/tiny-two"]
    for heading in ("Models", "Memory", "Engine"):
        assert f"<h2>{heading}</h2>" in text

    shot = tmp_path / "status.png"
    taken = browse(server.base_url + "/", f"--screenshot={shot}", "--window-size=1280,900")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    width, height, pixels = read_png(shot)
    assert (width, height) == (1280, 900)
    assert count_near(pixels, GREEN_BADGE) > 100  # the "ok" badge
    assert count_near(pixels, WEIGHTS_BLUE) > 100 + 20  # the weights' key in the legend, and in the bar
    assert count_near(pixels, PINNED_LABEL) > 50  # the "pinned" tag
    shutil.copy(shot, Path("/tmp") / f"mlx-gateway-status-{server.port}.png")  # for a person to look at
