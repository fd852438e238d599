"""Headless Chromium from Debian's packages (`chromium`, `chromium-driver`; `make install`
installs them), driven by Selenium. Used by the browser tests (tests/test_labeling_browser.py),
which also make the screenshots in docs/."""

from __future__ import annotations

import shutil
import tempfile

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless, no sandbox (tests may run as root or in a container), no GPU, and nothing that talks
# to the network or depends on a previous run: no background fetches, component updates, sync
# or first-run dialogs, and a fresh profile per session.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--force-device-scale-factor=1",
    "--lang=en-US",
)


def missing() -> str | None:
    """Why no browser can run here, or None."""
    if shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None:
        return (
            f"Debian's chromium and chromium-driver are not installed ({CHROMIUM}, {CHROMEDRIVER}); `make install` "
            "installs them (apt-get install chromium chromium-driver, as root)"
        )
    return None


class Chromium:
    """A headless Chromium session with its own fresh --user-data-dir, removed on quit(). The
    driver path is given, so Selenium never looks for one on the network."""

    def __init__(self, width: int = 1360, height: int = 1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="rm-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in FLAGS + (f"--window-size={width},{height}", f"--user-data-dir={self.profile}"):
            options.add_argument(arg)
        try:
            self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        except BaseException:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def chromium(width: int = 1360, height: int = 1000) -> Chromium:
    return Chromium(width, height)
