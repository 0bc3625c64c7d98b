"""The dashboard (/admin/) in real headless Chromium, against a running server whose
devices are simulated in another process: upload through the form (dry run
first), watch the bar reach 100 %, pause and resume, read a failed device's
reason. A screenshot of every page is kept under pytest's temporary folder.

Needs Debian's `chromium` and `chromium-driver`; without them the tests skip
with that reason (BLYNKOTA_REQUIRE_BROWSER=1, set by CI, makes it a failure).
"""

import base64
import os
import re
import shutil
import subprocess
import sys

import pytest

from .images import esp8266_image
from .servers import ADMIN_EMAIL, ADMIN_PASS, ROOT, ServerProcess, sqlite_fleet, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
OLD, NEW, NEWER = "Jan  1 2026 00:00:00", "Nov 28 2026 10:00:00", "Nov 28 2026 11:00:00"
GOOD_DEVICES = 5
WAIT = 60  # seconds for anything the page should show

if not (CHROMIUM and CHROMEDRIVER):
    reason = "Chromium and ChromeDriver are not installed (apt install chromium chromium-driver)"
    if os.environ.get("BLYNKOTA_REQUIRE_BROWSER") == "1":
        raise RuntimeError(reason + "; BLYNKOTA_REQUIRE_BROWSER=1 asks for them")
    pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.expected_conditions import alert_is_present  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def fleet_server(tmp_path_factory):
    """One server, a user with five good boards and a user with one that never takes an update."""
    folder = tmp_path_factory.mktemp("dashboard")
    db_url, (*good, bad) = sqlite_fleet(
        folder,
        [("good@example.com", "Garden", f"sensor-{n}") for n in range(GOOD_DEVICES)]
        + [("bad@example.com", "Shed", "stubborn")],
    )
    server = ServerProcess(
        folder, db_url, **{"ota.retry.backoff": 0.2, "ota.abort.failure.ratio": 1}
    ).start()
    devices = [
        _simulator(server, good, "none", folder / "good.log"),
        _simulator(server, [bad], "old-build", folder / "bad.log"),
    ]
    wait_until(
        lambda: (
            sum(row["online"] for row in server.admin("GET", "/admin/devices").json())
            == GOOD_DEVICES + 1
        ),
        timeout=WAIT,
        message="every simulated board online",
    )
    yield server, folder
    for process in devices:
        process.terminate()
        process.wait(10)
    server.stop()


def _simulator(server: ServerProcess, tokens: list[str], fail: str, log_path):
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable, "-m", "blynkota.simulator", "--port", str(server.http_port),
                "--token", ",".join(tokens), "--build", OLD, "--fail", fail,
                "--heartbeat", "5", "--duration", "300",
            ],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.fixture(scope="module")
def browser(fleet_server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",  # the admin port's certificate is self-signed
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # The browser sends the admin's basic auth with every request, as one that
    # has been given the password does.
    credentials = base64.b64encode(f"{ADMIN_EMAIL}:{ADMIN_PASS}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}}
    )
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots in {folder}")
    return folder


def _wait(driver, condition, message: str):
    WebDriverWait(driver, WAIT, poll_frequency=0.2).until(
        lambda _: condition(), message=f"{message} within {WAIT}s"
    )


def _press(driver, selector: str) -> None:
    """Press a button that posts a form, and wait for the page it leads to."""
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, selector).click()
    _replaced(driver, page, "the next page")


def _replaced(driver, page, message: str) -> None:
    """Until `page` (its <html> element) has been replaced by the next one.

    As Selenium's staleness condition, but while the old document is torn
    down chromedriver may answer with an "unknown error" (the node "does not
    belong to the document") instead of a stale element: replaced too."""

    def gone(_) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            if "does not belong to the document" not in str(error):
                raise
            return True
        return False

    WebDriverWait(driver, WAIT).until(gone, message=message)


def _notice(driver) -> str:
    """The page's notice line, once the page that shows it has loaded."""
    found = []
    _wait(
        driver,
        lambda: found.extend(driver.find_elements(By.CSS_SELECTOR, ".notice")) or found,
        "a notice",
    )
    return found[0].text


def _count(driver, name: str) -> int:
    return int(driver.find_element(By.CSS_SELECTOR, f'[data-count="{name}"]').text)


def _bar_share(driver, name: str) -> float:
    """The segment's width as a share of the whole bar, as the browser laid it out."""
    return driver.execute_script(
        "const bar = document.querySelector('.bar');"
        "const seg = bar.querySelector(`[data-seg='${arguments[0]}']`);"
        "return seg.getBoundingClientRect().width / bar.getBoundingClientRect().width;",
        name,
    )


def _upload(driver, server, folder, build: str, fields: dict[str, str], screenshots, shot: str):
    image = folder / f"{shot}.bin"
    image.write_bytes(esp8266_image(build, size=64 * 1024))
    driver.get(f"https://127.0.0.1:{server.https_port}/admin/upload")
    driver.find_element(By.NAME, "file").send_keys(str(image))
    for name, value in fields.items():
        element = (
            driver.find_element(By.CSS_SELECTOR, f'[name="{name}"][value="{value}"]')
            if (name == "scope")
            else driver.find_element(By.NAME, name)
        )
        if element.get_attribute("type") in ("radio", "checkbox"):
            element.click()
        else:
            element.clear()
            element.send_keys(value)
    start = driver.find_element(By.ID, "start")
    assert not start.is_enabled()  # a dry run comes first
    driver.find_element(By.ID, "dry-run").click()
    _wait(driver, start.is_enabled, "the dry run's answer")
    result = driver.find_element(By.ID, "upload-result").text
    assert result.startswith("Dry run: build " + build), result
    planned = driver.find_elements(By.CSS_SELECTOR, "#upload-result .plan tbody tr")
    assert len(planned) == int(re.search(r"(\d+) device\(s\) would be", result).group(1))
    progress = driver.find_element(By.ID, "upload-progress")
    assert float(progress.get_attribute("value")) == 100
    driver.save_screenshot(str(screenshots / f"{shot}-dry-run.png"))
    start.click()
    _wait(driver, lambda: "/admin/rollouts/" in driver.current_url, "the rollout's page")
    return result


def test_upload_watch_pause_resume_and_a_failed_device(fleet_server, browser, screenshots):
    server, folder = fleet_server
    driver = browser

    plan = _upload(
        driver, server, folder, NEW,
        {"scope": "user", "user": "good@example.com", "now": "true"},
        screenshots, "upload-good",
    )  # fmt: skip
    assert f"{GOOD_DEVICES} device(s) would be taken in now" in plan
    assert "started" in _notice(driver)
    # Live: the page is not reloaded; the numbers and the bar follow the API.
    driver.execute_script("window.notReloaded = true")
    _wait(driver, lambda: _count(driver, "updated") == GOOD_DEVICES, "every good board updated")
    assert driver.execute_script("return window.notReloaded") is True
    _wait(driver, lambda: _bar_share(driver, "updated") > 0.99, "the bar at 100 %")
    assert _count(driver, "total") == GOOD_DEVICES and _count(driver, "failed") == 0
    # The device table follows too, without a reload.
    _wait(
        driver,
        lambda: (
            len(driver.find_elements(By.CSS_SELECTOR, 'tr[data-device-state="updated"]'))
            == GOOD_DEVICES
        ),
        "every row of the table updated",
    )
    assert driver.execute_script("return window.notReloaded") is True
    driver.save_screenshot(str(screenshots / "rollout-complete.png"))

    # The stubborn board: paused before it is offered, resumed, then it fails with a reason.
    _upload(
        driver, server, folder, NEWER,
        {"scope": "user", "user": "bad@example.com", "maxAttempts": "1", "now": "true"},
        screenshots, "upload-bad",
    )  # fmt: skip
    _press(driver, "button.pause")
    assert "pause done" in _notice(driver)
    assert driver.find_element(By.CSS_SELECTOR, '[data-field="state"]').text == "paused"
    # Buttons by state: nothing to pause on a paused rollout.
    assert _enabled(driver) == {"pause": False, "resume": True, "stop": True}
    assert driver.find_element(By.CSS_SELECTOR, '[data-field="pause_reason"]').text.startswith(
        "by "
    )
    _press(driver, "button.resume")
    assert "resume done" in _notice(driver)
    # Active again, or already complete (the board may have failed its one attempt).
    assert driver.find_element(By.CSS_SELECTOR, '[data-field="state"]').text in (
        "active",
        "complete",
    )
    _wait(driver, lambda: _count(driver, "failed") == 1, "the stubborn board failed")
    rollout_page = driver.current_url.split("?")[0]
    driver.get(rollout_page + "?state=failed")
    error = driver.find_element(By.CSS_SELECTOR, 'tr[data-device-state="failed"] td.error').text
    # (HTML shows the build's two spaces as one)
    assert error == "came back with build " + " ".join(OLD.split())
    driver.save_screenshot(str(screenshots / "rollout-failed-device.png"))

    # Retry gives it a fresh attempt (which fails the same way); stop asks first.
    _press(driver, "button.retry")
    assert "retry done" in _notice(driver)
    _wait(driver, lambda: _count(driver, "failed") == 1, "the retried board failed again")
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, "button.stop").click()
    alert = WebDriverWait(driver, WAIT).until(alert_is_present(), message="the confirmation")
    assert alert.text.startswith("Stop rollout ")
    alert.accept()
    _replaced(driver, page, "the next page")
    assert "stop done" in _notice(driver)
    assert driver.find_element(By.CSS_SELECTOR, '[data-field="state"]').text == "stopped"
    # Stopped: nothing left to press.
    assert _enabled(driver) == {"pause": False, "resume": False, "stop": False}
    assert not driver.find_element(By.CSS_SELECTOR, "button.retry").is_enabled()


def _enabled(driver) -> dict[str, bool]:
    return {
        action: driver.find_element(By.CSS_SELECTOR, f"button.{action}").is_enabled()
        for action in ("pause", "resume", "stop")
    }


def test_every_page_renders_on_a_laptop_and_a_phone(fleet_server, browser, screenshots):
    server, _ = fleet_server
    driver = browser
    base = f"https://127.0.0.1:{server.https_port}/admin"
    device_id = server.admin("GET", "/admin/devices?search=stubborn").json()[0]["id"]
    pages = (
        ("/", "Rollouts"),
        ("/rollouts/1", "Rollout #1"),
        ("/fleet", "Fleet"),
        ("/fleet/devices", "Devices"),
        (f"/fleet/devices/{device_id}", "stubborn"),
        ("/upload", "Firmware"),
        ("/activity", "Audit trail"),
    )
    for size, (width, height) in {"laptop": (1280, 1000), "phone": (375, 812)}.items():
        driver.set_window_size(width, height)
        for page, heading in pages:
            driver.get(base + page)
            assert driver.find_element(By.TAG_NAME, "h1").text.startswith(heading)
            # Nothing wider than the screen: tables scroll inside their cards.
            overflow = driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{page} is {overflow}px wider than a {size} screen"
            name = page.strip("/").replace("/", "-") or "rollouts"
            driver.save_screenshot(str(screenshots / f"{size}-{name}.png"))
    driver.set_window_size(1280, 1000)
    driver.get(base + "/fleet")
    assert "devices online" in driver.find_element(By.CSS_SELECTOR, ".big").text


def test_a_form_without_the_token_is_refused(fleet_server, browser):
    """A page on another site cannot make the browser press a button: a browser's
    state-changing request needs the page's token, a script's (no Origin) does not."""
    server, _ = fleet_server
    driver = browser
    driver.get(f"https://127.0.0.1:{server.https_port}/admin/")
    post = (
        "const done = arguments[arguments.length - 1];"
        "const headers = arguments[0] ? {'X-CSRF-Token': arguments[0]} : {};"
        "fetch('/admin/ota/stop?rollout=999', {method: 'POST', headers})"
        ".then(async r => done([r.status, await r.text()]));"
    )
    status, body = driver.execute_async_script(post, "")
    assert status == 403 and "csrf_token" in body
    token = driver.find_element(By.CSS_SELECTOR, 'meta[name="csrf-token"]').get_attribute("content")
    assert len(token) == 64
    status, body = driver.execute_async_script(post, token)
    assert (status, body) == (404, "No rollout 999.")  # past the check: the route's own answer
    assert server.admin("POST", "/admin/ota/stop?rollout=999").status == 404  # a script: no token


def test_devices_search_a_device_page_and_the_audit_trail(fleet_server, browser, screenshots):
    server, _ = fleet_server
    driver = browser
    base = f"https://127.0.0.1:{server.https_port}/admin"
    driver.get(base + "/fleet/devices")
    rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-device]")
    assert len(rows) == GOOD_DEVICES + 1
    search = driver.find_element(By.NAME, "search")
    search.send_keys("stubborn")
    _press(driver, "form.search button")
    (row,) = driver.find_elements(By.CSS_SELECTOR, "tr[data-device]")
    assert "stubborn" in row.text and "bad@example.com / Shed" in row.text
    page = driver.find_element(By.TAG_NAME, "html")
    row.find_element(By.TAG_NAME, "a").click()
    _replaced(driver, page, "the device's page")
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("stubborn t:")
    facts = driver.find_element(By.CSS_SELECTOR, ".facts").text
    assert "bad@example.com / Shed" in facts and "online since" in facts
    driver.find_element(By.CSS_SELECTOR, '#add-tag [name="tag"]').send_keys("Shed-North")
    _press(driver, "#add-tag button")
    assert "Tag added." in _notice(driver)
    chips = [chip.text for chip in driver.find_elements(By.CSS_SELECTOR, ".facts .chip")]
    assert [chip.split()[0] for chip in chips] == ["shed-north"]
    driver.save_screenshot(str(screenshots / "device-page.png"))
    _press(driver, ".facts button.untag")
    assert "Tag removed." in _notice(driver)
    assert driver.find_elements(By.CSS_SELECTOR, ".facts .chip") == []
    driver.get(base + "/activity")
    entries = driver.find_elements(By.CSS_SELECTOR, "tr[data-audit]")
    starts = [entry.text for entry in entries if " start " in f" {entry.text} "]
    assert starts and all("admin@blynk.cc" in text and "200" in text for text in starts)


def test_the_upload_form_shows_its_targets_fields_and_no_start_for_nobody(fleet_server, browser):
    server, folder = fleet_server
    driver = browser
    driver.get(f"https://127.0.0.1:{server.https_port}/admin/upload")
    user = driver.find_element(By.NAME, "user")
    token = driver.find_element(By.NAME, "token")
    assert not user.is_displayed() and not token.is_displayed()  # all devices: no field
    driver.find_element(By.CSS_SELECTOR, '[name="scope"][value="device"]').click()
    assert token.is_displayed() and not user.is_displayed()
    driver.find_element(By.CSS_SELECTOR, '[name="scope"][value="user"]').click()
    assert user.is_displayed() and not token.is_displayed()
    # A dry run that takes in nobody (a user no board of which differs) offers no start.
    image = folder / "nobody.bin"
    image.write_bytes(esp8266_image(OLD, size=64 * 1024))
    driver.find_element(By.NAME, "file").send_keys(str(image))
    user.send_keys("bad@example.com")
    driver.find_element(By.ID, "dry-run").click()
    result = driver.find_element(By.ID, "upload-result")
    _wait(driver, lambda: result.text.startswith("Dry run"), "the dry run's answer")
    assert "0 device(s) would be taken in now" in result.text
    assert not driver.find_element(By.ID, "start").is_enabled()
