"""The playground page in headless Chromium: type a prompt, click Generate, see streamed text.

Driven over the DevTools protocol (websockets), so no Playwright or driver binary is needed;
the screenshot is kept as tests/artifacts/playground.png. `make test` installs Debian's
chromium first (make deps-system); without it this test is skipped, saying why.
"""

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

websockets = pytest.importorskip("websockets")

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("no chromium on PATH; `make deps-system` installs Debian's")


class DevTools:
    """The smallest CDP client: send a method, wait for its result."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                                 returnByValue=True)
        return result["result"].get("value")


async def drive(devtools_port: str, page_url: str) -> tuple[str, str, bytes]:
    """Open the page in chromium's first tab, generate, return (text, status line, PNG)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list") as r:
        page_ws = next(t["webSocketDebuggerUrl"] for t in json.load(r) if t["type"] == "page")
    async with websockets.connect(page_ws, max_size=None) as ws:
        page = DevTools(ws)
        await page.call("Page.enable")
        await page.call("Emulation.setDeviceMetricsOverride", width=1000, height=800,
                        deviceScaleFactor=1, mobile=False)
        await page.call("Page.navigate", url=page_url)
        for _ in range(100):  # wait for the page and its /healthz call
            if await page.js("document.readyState") == "complete" and \
                    "tiny-gpt2" in (await page.js("document.getElementById('model').textContent")):
                break
            await asyncio.sleep(0.1)
        await page.js("document.getElementById('prompt').value = 'ROMEO: hello';"
                      "document.getElementById('max_tokens').value = '40';"
                      "document.getElementById('seed').value = '4';"
                      "document.getElementById('go').click()")
        for _ in range(300):
            state = await page.js("document.body.dataset.state || ''")
            if state:
                break
            await asyncio.sleep(0.1)
        generated = await page.js("document.getElementById('generated').textContent")
        status = await page.js("document.getElementById('status').textContent")
        shot = await page.call("Page.captureScreenshot", format="png")
        return generated, status, base64.b64decode(shot["data"])


def test_playground_streams_text_in_chromium(server, tmp_path):
    exe = chromium()
    profile = tmp_path / "profile"
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not active.is_file() or len(active.read_text().split()) < 2:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail("chromium did not open its DevTools port within 30 s")
            time.sleep(0.1)
        port = active.read_text().split()[0]
        generated, status, png = asyncio.run(drive(port, server + "/"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "playground.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert status.startswith("done:"), status
    assert generated, "the page showed no generated text"
    # the page streamed what the API returns for the same request
    api = httpx.post(f"{server}/v1/completions", timeout=60, json={
        "prompt": "ROMEO: hello", "max_tokens": 40, "seed": 4, "top_p": 0.9,
        "temperature": 1.0}).json()["choices"][0]["text"]
    assert generated == api
