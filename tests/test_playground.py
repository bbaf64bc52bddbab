"""The playground page in a real headless browser (Debian's chromium and its driver) against a
real `offramp serve`: load it, type two sentences, move the threshold from 0 to 1 and watch the
exit layers go from full depth to the first exit; the server's errors as the server words them;
a phone-sized screen. OFFRAMP_SCREENSHOTS=DIR keeps screenshots (docs/serving.md shows them)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.serving import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI runs the browser test: apt-get install chromium chromium-driver")
    pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_bundle):
    proc, url = start_server(tiny_bundle["models"], max_inputs=4)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_window_size(1200, 900)
    yield driver
    driver.quit()


def _screenshot(browser, name: str) -> None:
    folder = os.environ.get("OFFRAMP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / name))


def _slide(browser, value: float) -> None:
    browser.execute_script("const s = document.getElementById('threshold'); s.value = arguments[0];"
                           "s.dispatchEvent(new Event('input'));", value)


def _exit_layers(browser, expected: set[str]) -> list[str]:
    wait = WebDriverWait(browser, 20)
    wait.until(lambda b: {e.text for e in b.find_elements(By.CSS_SELECTOR, "td.exit-layer")} == expected
               and len(b.find_elements(By.CSS_SELECTOR, "td.exit-layer")) == 2)
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "td.exit-layer")]


def test_moving_the_threshold_from_0_to_1_takes_rows_from_full_depth_to_the_first_exit(server, browser):
    browser.get(server + "/")
    browser.find_element(By.LINK_TEXT, "Playground").click()
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
    assert "tiny" in browser.find_element(By.ID, "model").text
    box = browser.find_element(By.ID, "texts")
    box.send_keys("a gripping, beautifully acted film\nthe plot makes no sense at all")
    _slide(browser, 0.0)
    assert _exit_layers(browser, {"3"}) == ["3", "3"]  # the tiny model's 3 layers: full depth
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "current-point"))
    full_point = browser.find_element(By.ID, "current-point").get_attribute("cx")
    _screenshot(browser, "playground-threshold-0.png")
    _slide(browser, 1.0)
    assert _exit_layers(browser, {"1"}) == ["1", "1"]
    assert browser.find_element(By.ID, "threshold-value").text == "1.00"
    assert browser.find_element(By.ID, "current-point").get_attribute("cx") != full_point  # the dot moved
    _screenshot(browser, "playground-threshold-1.png")


def test_the_servers_errors_are_shown_as_the_server_words_them(server, browser):
    browser.get(server + "/playground")
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
    browser.find_element(By.ID, "texts").send_keys("\n".join(["one", "two", "three", "four", "five"]))
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == "inputs: 5 texts, at most 4 per request"


def test_it_fits_a_phone_sized_screen(server, browser):
    browser.set_window_size(390, 844)
    try:
        browser.get(server + "/playground")
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
        browser.find_element(By.ID, "texts").send_keys("a fine film\ndull")
        _slide(browser, 1.0)
        _exit_layers(browser, {"1"})
        width = browser.execute_script("return document.documentElement.scrollWidth")
        viewport = browser.execute_script("return window.innerWidth")
        assert width <= viewport  # no sideways scrolling
        _screenshot(browser, "playground-phone.png")
    finally:
        browser.set_window_size(1200, 900)


@pytest.fixture(scope="module")
def multitask_server(tiny_multitask_bundle):
    proc, url = start_server(tiny_multitask_bundle.parent)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_a_multitask_model_gets_a_task_picker_and_regression_rows_show_their_score(multitask_server, browser):
    from selenium.webdriver.support.ui import Select

    browser.get(multitask_server + "/playground")
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#task option"))
    assert browser.find_element(By.ID, "task-box").is_displayed()
    assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "task")).options] == \
        ["sent", "pair", "sim"]
    Select(browser.find_element(By.ID, "task")).select_by_value("sim")
    assert browser.find_element(By.ID, "policy").get_attribute("disabled")  # its one rule
    # (a typed tab would move the focus: the pairs are set as the page's value)
    browser.execute_script("const t = document.getElementById('texts'); t.value = arguments[0];"
                           "t.dispatchEvent(new Event('input'));",
                           "a man plays a guitar\ta man plays music\na dog runs\ttwo cats sleep")
    _slide(browser, 0.0)
    _exit_layers(browser, {"3"})
    scores = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#results b")]
    assert len(scores) == 2 and all(float(s) == float(s) for s in scores)  # numbers, not labels
    assert "task sim" in browser.find_element(By.ID, "summary").text
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "current-point"))
    Select(browser.find_element(By.ID, "task")).select_by_value("sent")
    policy = browser.find_element(By.ID, "policy")
    assert not policy.get_attribute("disabled") and policy.get_attribute("value") == "entropy"  # given back
    browser.find_element(By.ID, "texts").clear()
    browser.find_element(By.ID, "texts").send_keys("a fine film\ndull")
    _slide(browser, 1.0)
    _exit_layers(browser, {"1"})
    assert browser.find_element(By.ID, "error").text == ""
    _screenshot(browser, "playground-multitask.png")
