"""The real App in headless Chromium: one App server and one browser page per test session.

The App server (``python -m fiftyone.server.main``) runs against the session's private mongod
(``tests/conftest.py``) with scheduling enabled; Chromium is Debian's (``apt-get install
chromium``), driven by Playwright's Python client (never a browser ``playwright install``
downloads). Where either is missing the suite is skipped with a warning naming what to install.

``CuratorApp`` is the vocabulary of the tests: open an operator by its label, fill a field by
its label, execute or schedule, read what the page shows.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import time
import warnings

import pytest

from ntt_operators import sandbox

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the suite is skipped then, with a warning (see _missing)
    PlaywrightTimeout = TimeoutError

TIMEOUT_MS = int(os.environ.get("NTT_BROWSER_TIMEOUT_MS", 120_000))
"""Generous: two shared CPU cores, and the first model load happens inside the App server."""
RUN_TIMEOUT_MS = 600_000
"""A whole run in the App server: generous, the machine's cores are shared."""
STALL_MS = int(os.environ.get("NTT_BROWSER_STALL_MS", 180_000))
"""While waiting for a run, how long neither the page nor the App server's log may stay still:
a run shows progress, so a longer silence means it is not running (fail then, saying what the
page shows, instead of waiting ``RUN_TIMEOUT_MS``)."""
APP_SERVER_LOG = "app-server.log"
APP_ERRORS = re.compile(r"^(GraphQL API Error|What went wrong)$")
"""The App's error page, and the result dialog of a run that failed (``forms.failure_outputs``)."""


def _missing() -> str | None:
    if sandbox.chromium_path() is None:
        return "Debian's Chromium is not installed (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright's Python client is not installed (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture(scope="session")
def app_url(run_dir):
    missing = _missing()
    if missing:
        warnings.warn(f"THE BROWSER SUITE DID NOT RUN: {missing}", stacklevel=1)
        pytest.skip(f"browser suite skipped: {missing}")
    port = sandbox.free_port()
    server = sandbox.start_app_server(port, run_dir / APP_SERVER_LOG)
    yield f"http://127.0.0.1:{port}"
    sandbox.stop(server)


# Per module: while Playwright's sync API is open it runs an event loop in this thread, and
# FiftyOne calls asyncio.run (delegated runs, execute_operator) in the test files after this one.
@pytest.fixture(scope="module")
def browser_page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=sandbox.chromium_path(), headless=True, args=sandbox.CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def persistent_dataset(name: str):
    """A new, empty dataset the App server (another process) can load, replacing a leftover."""
    import fiftyone as fo

    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    return fo.Dataset(name, persistent=True)


class CuratorApp:
    """What a curator does in the App, as Playwright steps with explicit waits on visible text."""

    def __init__(self, page, url: str, server_log: pathlib.Path) -> None:
        self.page = page
        self.url = url
        self.server_log = server_log

    # -- navigation ---------------------------------------------------------------------------

    def open_dataset(self, name: str, field: str = "ground_truth") -> None:
        """Loads the dataset's grid; ``field`` (a label field) shows once the sidebar is in."""
        self.page.goto(f"{self.url}/datasets/{name}", wait_until="load")
        self.page.get_by_text(field, exact=True).first.wait_for()
        dismiss = self.page.get_by_text("Dismiss", exact=True)  # the "Explore Enterprise" pop-up
        if dismiss.count():
            dismiss.first.click()

    def reload(self) -> None:
        self.page.reload(wait_until="load")
        self.page.get_by_text("ground_truth", exact=True).first.wait_for()

    def open_operator(self, label: str) -> None:
        """The operator browser (backtick), filtered to ``label``, then its form."""
        self.close_dialogs()
        self.page.keyboard.press("`")
        self.page.keyboard.type(label)
        self.page.get_by_text(label, exact=True).first.wait_for()
        self.page.keyboard.press("Enter")
        self.dialog.get_by_text(label, exact=True).first.wait_for()

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.page.locator("[role=dialog]").count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)

    @property
    def dialog(self):
        return self.page.locator("[role=dialog]").last

    # -- the form -----------------------------------------------------------------------------

    def field(self, label: str):
        """The input of the form field whose label reads ``label``."""
        box = self.dialog.locator("div.MuiGrid-item").filter(
            has=self.page.locator("p", has_text=re.compile(f"^{re.escape(label)}$"))
        )
        return box.last.locator("input").first

    def fill(self, label: str, value: str) -> None:
        """Types ``value`` into a text field, then waits for the form to be resolved again."""
        field = self.field(label)
        field.fill(value)
        field.press("Tab")
        self.settle()

    def add_value(self, label: str, value: str) -> None:
        """Adds ``value`` to a list field (type, then Enter)."""
        field = self.field(label)
        field.fill(value)
        field.press("Enter")
        self.settle()

    def choose_option(self, label: str, value: str) -> None:
        """Picks ``value`` in a dropdown field."""
        box = self.dialog.locator("div.MuiGrid-item").filter(
            has=self.page.locator("p", has_text=re.compile(f"^{re.escape(label)}$"))
        )
        box.last.locator("[role=combobox]").first.click()
        self.page.get_by_role("option", name=value, exact=True).click()
        self.settle()

    def tick(self, label: str, checked: bool = True) -> None:
        # A checkbox's accessible name is its label followed by its description.
        box = self.dialog.get_by_label(re.compile(f"^{re.escape(label)}"))
        box.set_checked(checked)
        self.settle()

    def choose(self, label: str) -> None:
        """Clicks a radio choice by its label."""
        self.dialog.get_by_text(label, exact=True).first.click()
        self.settle()

    def settle(self) -> None:
        # A dynamic form is re-resolved by the server after each change; no event says when
        # the new form is in, so allow the round trip.
        self.page.wait_for_timeout(1500)

    def expect_text(self, text: str, timeout: float = TIMEOUT_MS) -> None:
        """Waits for ``text``; fails at once if the App shows an error page or a failed run, and
        early if neither the page nor the server's log changes for ``STALL_MS``."""
        wanted = self.page.get_by_text(text, exact=False)
        either = wanted.or_(self.page.get_by_text(APP_ERRORS)).first
        deadline = time.monotonic() + timeout / 1000
        still_since, last = time.monotonic(), None
        while True:
            try:
                either.wait_for(timeout=min(2000, timeout))
                break
            except PlaywrightTimeout:
                now = time.monotonic()
                state = (self._body(), self._log_size())
                if state != last:
                    still_since, last = now, state
                if now > deadline or (now - still_since) * 1000 > STALL_MS:
                    waited = (
                        "timed out"
                        if now > deadline
                        else f"nothing changed for {STALL_MS / 1000:.0f} s"
                    )
                    raise AssertionError(
                        f"Waiting for {text!r}: {waited}. The page shows: {state[0][:800]!r}\n"
                        f"App server log (last lines):\n{self._log_tail()}"
                    ) from None
        if not wanted.count():
            raise AssertionError(
                f"Waiting for {text!r}, the App shows an error: {self._body()[:800]}\n"
                f"App server log (last lines):\n{self._log_tail()}"
            )

    def _body(self) -> str:
        try:
            return self.page.locator("body").inner_text(timeout=5000)
        except PlaywrightTimeout:
            return "(the page did not answer within 5 s)"

    def _log_size(self) -> int:
        return self.server_log.stat().st_size if self.server_log.exists() else 0

    def _log_tail(self, lines: int = 30) -> str:
        if not self.server_log.exists():
            return "(no log)"
        return "\n".join(self.server_log.read_text(errors="replace").splitlines()[-lines:])

    def dialog_text(self) -> str:
        return self.dialog.inner_text()

    # -- execution ----------------------------------------------------------------------------

    @property
    def execute_button(self):
        return self.dialog.get_by_role("button", name=re.compile("^(Execute|Schedule)$")).first

    def execute_enabled(self) -> bool:
        return self.execute_button.is_enabled()

    def execute(self) -> None:
        """Runs the form immediately (the Execute choice of the Execute/Schedule menu)."""
        self._run_as("Execute")

    def schedule(self) -> None:
        """Queues the form as a delegated run (the Schedule choice)."""
        self._run_as("Schedule")

    def _run_as(self, choice: str) -> None:
        button = self.execute_button
        if button.inner_text().strip() != choice:
            self.dialog.locator("button").last.click()  # the arrow of the split button
            self.page.get_by_role("menuitem").filter(has_text=choice).first.click()
            # On a busy machine the button can take a while to change: clicking it before
            # would run the other way (a run scheduled instead of executed waits for ever).
            deadline = time.monotonic() + TIMEOUT_MS / 1000
            while self.execute_button.inner_text().strip() != choice:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"The run button never switched to {choice!r}: {self.dialog_text()[:800]}"
                    )
                self.page.wait_for_timeout(200)
        self.execute_button.click()


@pytest.fixture(scope="module")
def curator(browser_page, app_url, run_dir) -> CuratorApp:
    return CuratorApp(browser_page, app_url, run_dir / APP_SERVER_LOG)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, a screenshot of the page and the App server's log in $NTT_BROWSER_ARTIFACTS
    (if set), to see why."""
    outcome = yield
    report = outcome.get_result()
    folder = os.environ.get("NTT_BROWSER_ARTIFACTS")
    app = item.funcargs.get("app") or item.funcargs.get("curator")
    page = getattr(app, "page", None)
    if report.failed and folder and page is not None:
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{item.name}.png"))
        (folder / f"{item.name}.txt").write_text(app._body())
        # The operators run in the App server: its log holds their tracebacks too.
        shutil.copy(app.server_log, folder / "app-server.log")
