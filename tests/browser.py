"""A real browser for the dashboard's tests: Debian's Chromium, headless, driven by selenium
through Debian's chromedriver.

Nothing is downloaded: the browser and the driver are the Debian packages' (`make test`
installs them), and both paths are given to selenium, so its Selenium Manager never runs. The
flags are those a root user on a machine without network needs: no sandbox (root), no GPU, and
none of Chromium's own background connections (refused here). Each browser gets an empty
profile.

Selenium's calls block. The server under test runs in the test's event loop, so `Page` runs
every call in a thread (`await page.js(...)`), and the server keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from speech import require_program

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--window-size=1400,1000", "--lang=en-US"]


class Browser:
    """One headless Chromium (one tab), its profile removed when closed."""

    def __init__(self) -> None:
        binary, driver = require_program("chromium"), require_program("chromedriver")
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self._profile.name}")
        # The DevTools network events: every URL the page requested, and its websocket handshakes.
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(driver), options=options)

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            self._profile.cleanup()


class Page:
    """The browser's tab, with async methods that do not block the event loop."""

    def __init__(self, browser: Browser):
        self.driver = browser.driver

    async def call(self, function, *args):
        return await asyncio.to_thread(function, *args)

    async def open(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args):
        """Run `script` (a function body: `return …`) in the page."""
        return await self.call(self.driver.execute_script, script, *args)

    async def wait(self, script: str, *args, timeout: float = 15.0, what: str = "the page"):
        """Until `script` returns something truthy; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the page shows: {await self.text()!r}")
            await asyncio.sleep(0.05)

    async def text(self) -> str:
        """What a person sees: the visible text of the page."""
        return await self.js("return document.body.innerText")

    async def click(self, css: str) -> None:
        element = await self.call(self.driver.find_element, By.CSS_SELECTOR, css)
        await self.call(element.click)

    async def click_row(self, call_sid: str) -> None:
        """Click a call's row in the list, as a person would."""
        row = await self.call(self.driver.find_element, By.XPATH, f"//tbody/tr[td[1][normalize-space()='{call_sid}']]")
        await self.call(row.click)

    async def type(self, css: str, text: str) -> None:
        element = await self.call(self.driver.find_element, By.CSS_SELECTOR, css)
        await self.call(element.clear)
        await self.call(element.send_keys, text)

    async def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.call(self.driver.save_screenshot, str(path))
        return path

    async def network_events(self) -> list[dict]:
        """DevTools Network.* events since the last call (requests, websocket handshakes)."""
        entries = await self.call(self.driver.get_log, "performance")
        events = [json.loads(entry["message"])["message"] for entry in entries]
        return [e for e in events if e.get("method", "").startswith("Network.")]

    async def console(self) -> list[dict]:
        """The page's console messages since the last call (errors, CSP violations)."""
        return await self.call(self.driver.get_log, "browser")
