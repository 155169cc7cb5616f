"""The web console in a real browser (issue 14): Debian's headless Chromium driven by Selenium against the API process,
a device on the SDK over mTLS through our Mosquitto plugin sending readings and answering commands. Screenshots are
kept in ``test-artifacts/console/``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from kestrel.devtools.servers import PostgresServer
from kestrel_device.client import DeviceClient
from tests.conftest import tenant_token
from tests.prodstack import ProdStack, stack_with_api

pytestmark = pytest.mark.e2e
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProdStack]:
    with stack_with_api(postgres, tmp_path_factory.mktemp("console")) as s:
        yield s


@contextlib.contextmanager
def browser(profile: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER or "chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Device:
    """An SDK device on its own thread and loop: connects over mTLS, sends ``temp`` on demand, answers ``reboot``
    after a second."""

    def __init__(self, s: ProdStack, tenant: str, device: str) -> None:
        self.client = DeviceClient(tenant, device, "127.0.0.1", s.auth.mtls_port, ssl=s.enrol(device))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _reboot(self, params: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(1.0)
        return {"rebooted": True, **params}

    def __enter__(self) -> Device:
        self.thread.start()
        self.client.on_command("reboot", self._reboot)
        self.run(self.client.connect())
        return self

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(20)

    def send(self, **metrics: Any) -> None:
        self.run(self.client.send_telemetry(metrics))

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):
            self.run(self.client.disconnect())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def sign_in(driver: webdriver.Chrome, url: str, token: str) -> WebDriverWait[webdriver.Chrome]:
    # The console re-renders the fleet table as presence and readings arrive, so an element found a moment ago may be
    # gone by the time it is read: a wait reads again rather than fail on that.
    wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))
    driver.get(url)
    wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(token)
    driver.find_element(By.ID, "signin").click()
    wait.until(ec.visibility_of_element_located((By.ID, "fleet-view")))
    return wait


def rows(driver: webdriver.Chrome) -> set[str]:
    """The devices of the fleet table, read in one script so that a re-render cannot come between finding a row and
    reading it."""
    script = "return Array.from(document.querySelectorAll('#fleet tbody tr'), r => r.dataset.device || '')"
    return set(driver.execute_script(script))


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason="Debian's chromium and chromium-driver are installed "
                    "by bootstrap.sh; without them there is no browser to drive")  # fmt: skip
def test_an_operator_sees_the_fleet_live_edits_desired_state_and_sends_a_command(
    stack: ProdStack, tmp_path: Path
) -> None:
    s = stack
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tenant, devices = s.tenant(2, prefix="ui")
    other, other_devices = s.tenant(1, prefix="uib")
    url = f"http://127.0.0.1:{s.ports['api']}/console/"
    token = tenant_token(s.url, tenant)["Authorization"].removeprefix("Bearer ")
    their_token = tenant_token(s.url, other)["Authorization"].removeprefix("Bearer ")
    with Device(s, tenant, devices[0]) as device, browser(tmp_path / "a") as driver, \
            browser(tmp_path / "b") as theirs:  # fmt: skip
        try:
            wait = sign_in(driver, url, token)
            wait.until(lambda d: rows(d) == set(devices))
            online = f'#fleet tr[data-device="{devices[0]}"] .presence'
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, online).text == "online")
            driver.save_screenshot(str(ARTIFACTS / "fleet.png"))

            driver.find_element(By.LINK_TEXT, devices[0]).click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "device-title"), devices[0]))
            device.send(temp=42.5)
            wait.until(lambda d: d.find_element(By.ID, "live-value").get_attribute("data-value") == "42.5")
            device.send(temp=43.25)  # arrives live, without a reload
            wait.until(lambda d: d.find_element(By.ID, "live-value").get_attribute("data-value") == "43.25")

            editor = driver.find_element(By.ID, "shadow-desired")
            editor.clear()
            editor.send_keys('{"target_temp": 21}')
            driver.find_element(By.ID, "save-desired").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "shadow-status"), "Saved"))
            assert device.run(device.client.wait_desired(lambda d: d["desired"] == {"target_temp": 21}, wait_s=15))

            driver.find_element(By.ID, "command-name").send_keys("reboot")
            driver.find_element(By.ID, "send-command").click()
            status = "#commands tbody tr:first-child .status-cell"
            seen: set[str] = set()

            def succeeded(d: webdriver.Chrome) -> bool:
                seen.add(d.find_element(By.CSS_SELECTOR, status).text)
                return "succeeded" in seen

            wait.until(succeeded)
            assert len(seen) >= 2, seen  # the status changed on screen (queued/sent/delivered before succeeded)
            driver.save_screenshot(str(ARTIFACTS / "device.png"))

            their_wait = sign_in(theirs, url, their_token)
            their_wait.until(lambda d: rows(d) == set(other_devices))
            assert not rows(theirs) & set(devices)
            theirs.get(f"{url}#/device/{devices[0]}")  # another tenant's device by its address
            their_wait.until(lambda d: "Could not load" in d.find_element(By.ID, "error").text)
            theirs.save_screenshot(str(ARTIFACTS / "other-tenant.png"))
        except (WebDriverException, AssertionError):
            driver.save_screenshot(str(ARTIFACTS / "failure.png"))
            (ARTIFACTS / "console.log").write_text("\n".join(str(e) for e in driver.get_log("browser")))
            raise
