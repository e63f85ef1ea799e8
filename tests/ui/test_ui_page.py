"""The web page against a live deployment of the embedded fastsd-shapes model (`fastsd serve --ui-port`):
through Gradio's API client, and in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium; `make test` installs them), judged by fastsd.judge. Screenshots go to out/."""
import io
import shutil
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fastsd.judge import judge

pytest.importorskip("gradio")  # the ui extra
pytest.importorskip("mii")  # the serving extra
pytestmark = pytest.mark.timeout(900)

PROMPT = "a red circle on a blue background"
OUT = Path(__file__).resolve().parents[2] / "out"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def page(shapes_deployment):
    assert shapes_deployment["url"], "the deployment was started without its page"
    return shapes_deployment["url"]


@pytest.fixture(scope="module")
def api(page):
    from gradio_client import Client
    return Client(page, verbose=False)


def image_of(gallery_item) -> Image.Image:
    return Image.open(gallery_item["image"] if isinstance(gallery_item, dict) else gallery_item[0])


# -- the API endpoint ----------------------------------------------------------------------------------
def test_the_page_is_a_child_of_the_deployment(shapes_deployment, page):
    from fastsd.serving.deploy import format_status, status
    s = status(shapes_deployment["name"])
    assert s["ui_port"] == shapes_deployment["ui_port"] and f"page {page}" in format_status(s)
    state = (shapes_deployment["dir"] / "state.json").read_text()
    assert '"ui"' in state  # the supervisor started it, and restarts it if it dies


def test_api_generate_with_named_inputs(api):
    params = [p["parameter_name"] for p in
              api.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]]
    assert params[:7] == ["prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height"]
    gallery, info, files = api.predict(prompt=PROMPT, steps=25, seed=0, api_name="/generate")
    assert len(gallery) == 1 and len(files) == 1 and gallery[0]["caption"] == "seed 0"
    image = image_of(gallery[0])
    assert image.size == (64, 64)
    verdict = judge(image, PROMPT)
    assert verdict.ok, verdict
    assert "seed 0" in info and "fastsd-shapes" in info and "float32" in info and "torch" in info
    assert Image.open(files[0]).tobytes() == image.tobytes()  # the PNG download is the image shown


def test_api_random_seed_says_which_seed_and_reproduces(api):
    gallery, info, _ = api.predict(prompt=PROMPT, steps=3, seed=-1, num_images=2, api_name="/generate")
    seeds = [int(g["caption"].split()[1]) for g in gallery]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1 and f"seed {seeds[0]}" in info
    again, _, _ = api.predict(prompt=PROMPT, steps=3, seed=seeds[0], num_images=2, api_name="/generate")
    assert [image_of(g).tobytes() for g in again] == [image_of(g).tobytes() for g in gallery]


def test_api_bad_value_is_a_readable_error_and_the_page_goes_on(api):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError) as e:
        api.predict(prompt=PROMPT, steps=2, width=100, api_name="/generate")
    assert "width: got 100" in str(e.value) and "multiple of 8" in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(AppError) as e:
        api.predict(prompt="  ", steps=2, api_name="/generate")
    assert "prompt" in str(e.value)
    gallery, _, _ = api.predict(prompt=PROMPT, steps=2, seed=1, api_name="/generate")
    assert len(gallery) == 1


# -- a real browser ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make test installs Debian's chromium and chromium-driver; "
                    "by hand: apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # the system driver: no download
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout=300):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)


def _set(driver, css, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element(By.CSS_SELECTOR, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(value))
    box.send_keys(Keys.TAB)  # Gradio takes a number box's value when it loses focus


def _result_text(driver) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, "#result").text


def _gallery_image(driver, page) -> Image.Image:
    from selenium.webdriver.common.by import By
    src = driver.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    with urllib.request.urlopen(urllib.request.Request(src), timeout=30) as r:
        return Image.open(io.BytesIO(r.read()))


def _open(driver, page):
    from selenium.webdriver.common.by import By
    driver.get(page)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 120)


def test_browser_generates_a_red_circle(browser, page):
    from selenium.webdriver.common.by import By
    _open(browser, page)
    _wait(browser, lambda d: "float32" in d.find_element(By.CSS_SELECTOR, "#engine").text, 60)  # the engine line
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    _set(browser, "#steps input[type=number]", 25)
    _set(browser, "#seed input", 0)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(browser, lambda d: "seed 0" in _result_text(d) and d.find_elements(By.CSS_SELECTOR, "#gallery img"))
    OUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUT / "ui-page.png"))
    image = _gallery_image(browser, page)
    verdict = judge(image, PROMPT)
    assert verdict.ok, f"{verdict} (screenshot: {OUT / 'ui-page.png'})"
    assert "fastsd-shapes" in _result_text(browser)


def test_browser_shows_a_bad_size_and_still_generates(browser, page):
    from selenium.webdriver.common.by import By
    _open(browser, page)
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    _set(browser, "#steps input[type=number]", 4)
    _set(browser, "#seed input", 3)
    _set(browser, "#width input", 100)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    message = "width: got 100; allowed: a multiple of 8"
    shown = _wait(browser, lambda d: [e for e in d.find_elements(By.XPATH, f"//*[contains(text(), '{message}')]")
                                      if e.is_displayed()], 120)
    assert "The deployment refused a value" in shown[0].text or "refused" in browser.page_source
    assert "Traceback" not in browser.page_source
    OUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUT / "ui-page-error.png"))
    _set(browser, "#width input", 0)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(browser, lambda d: "seed 3" in _result_text(d) and d.find_elements(By.CSS_SELECTOR, "#gallery img"))
    assert _gallery_image(browser, page).size == (64, 64)
