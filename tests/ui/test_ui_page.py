"""The web page against a live deployment of the embedded fastsd-shapes model (`fastsd serve --ui-port`):
through Gradio's API client, and in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium; `make test` installs them), judged by fastsd.judge. Screenshots go to out/."""
import io
import shutil
import urllib.request
from pathlib import Path

import numpy as np
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
    from fastsd.serving.status import format_status, status
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


# -- image-to-image, inpainting and LoRA through the API endpoint ------------------------------------------
def _scene(tmp_path):
    """A red circle in the bottom right on blue, and a mask of that quarter (white = repaint), as PNG files."""
    from PIL import ImageDraw
    image = Image.new("RGB", (64, 64), (30, 70, 225))
    ImageDraw.Draw(image).ellipse([36, 36, 60, 60], fill=(220, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    image.save(tmp_path / "circle.png")
    mask.save(tmp_path / "corner.png")
    return image, mask


def test_api_names_the_task_inputs(api):
    params = [p["parameter_name"] for p in
              api.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]]
    assert params[9:] == ["image", "mask_image", "strength", "lora", "lora_scale", "noise_level", "mask_paint"]


def test_api_image_to_image_recolours_the_uploaded_shape(api, tmp_path):
    from gradio_client import handle_file
    _scene(tmp_path)
    prompt = "a yellow circle on a blue background"
    gallery, info, _ = api.predict(prompt=prompt, steps=25, seed=0, image=handle_file(str(tmp_path / "circle.png")),
                                   strength=0.8, api_name="/generate")
    image = image_of(gallery[0])
    assert "image-to-image (strength 0.8)" in info and image.size == (64, 64)
    verdict = judge(image, prompt)
    assert verdict.ok, verdict


def test_api_inpainting_repaints_the_masked_corner_only(api, tmp_path):
    from gradio_client import handle_file

    from fastsd.judge import judge_region
    source, mask = _scene(tmp_path)
    prompt = "a yellow square in the bottom right on a blue background"
    gallery, info, _ = api.predict(prompt=prompt, steps=25, guidance=12, seed=0, strength=0.9,
                                   image=handle_file(str(tmp_path / "circle.png")),
                                   mask_image=handle_file(str(tmp_path / "corner.png")), api_name="/generate")
    assert "inpainting (strength 0.9)" in info
    verdict = judge_region(image_of(gallery[0]), prompt, mask, source)
    assert verdict.ok, verdict  # yellow in the mask, and the rest within judge.KEPT_PSNR_DB of the input


def test_api_mask_without_image_and_unknown_lora_are_readable_errors(api, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    _scene(tmp_path)
    with pytest.raises(AppError, match="mask_image"):
        api.predict(prompt=PROMPT, steps=2, mask_image=handle_file(str(tmp_path / "corner.png")), api_name="/generate")
    with pytest.raises(AppError) as e:
        api.predict(prompt=PROMPT, steps=2, lora="nope", api_name="/generate")
    assert "lora" in str(e.value) and "speckle" in str(e.value)  # the names the deployment offers


def test_api_lora_picker_offers_and_applies_the_deployments_adapters(api):
    info = api.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    lora = next(p for p in info if p["parameter_name"] == "lora")
    assert "speckle" in str(lora["python_type"]) or "speckle" in str(lora)  # the dropdown's choices
    plain, _, _ = api.predict(prompt=PROMPT, steps=4, seed=3, api_name="/generate")
    adapted, info_text, _ = api.predict(prompt=PROMPT, steps=4, seed=3, lora="speckle", lora_scale=1.0,
                                        api_name="/generate")
    assert "LoRA speckle:1" in info_text
    a, b = (np.asarray(image_of(g[0]), np.int16) for g in (plain, adapted))
    assert np.abs(a - b).max() > 10


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
    message = "width: got 100; allowed:"
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


def test_browser_image_to_image_from_an_uploaded_file(browser, page, tmp_path):
    """Upload a drawn red circle under "image-to-image and inpainting", ask for a yellow one, judge the result."""
    from selenium.webdriver.common.by import By
    _scene(tmp_path)
    _open(browser, page)
    browser.find_element(By.XPATH, "//*[@id='image_inputs']//button[contains(., 'image-to-image')]").click()
    upload = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"), 30)[0]
    upload.send_keys(str(tmp_path / "circle.png"))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"), 60)  # the upload is shown
    prompt = "a yellow circle on a blue background"
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt)
    _set(browser, "#steps input[type=number]", 25)
    _set(browser, "#seed input", 0)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(browser, lambda d: "image-to-image" in _result_text(d) and d.find_elements(By.CSS_SELECTOR, "#gallery img"))
    OUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUT / "ui-page-img2img.png"))
    verdict = judge(_gallery_image(browser, page), prompt)
    assert verdict.ok, f"{verdict} (screenshot: {OUT / 'ui-page-img2img.png'})"


# -- painting the mask, progress, cancel, scheduler, LoRA weight and the seed, in the browser ----------------
def _cli(tmp_path, prompt, seed, steps, *argv) -> Image.Image:
    """`fastsd generate` with the page's settings (its defaults: guidance 7.5, the model's size)."""
    from fastsd.cli import main
    out = tmp_path / f"cli-{seed}-{len(argv)}.png"
    assert main(["generate", prompt, "--model", "fastsd-shapes", "--quiet", "--steps", str(steps), "--seed", str(seed),
                 "--guidance", "7.5", "--out", str(out), *argv]) == 0
    return Image.open(out)


def _download(driver, name: str) -> Image.Image:
    """A file of the page's "PNG downloads" list, by its name."""
    from selenium.webdriver.common.by import By
    href = next(a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#files a")
                if a.get_attribute("href").endswith("/" + name))
    with urllib.request.urlopen(href, timeout=30) as r:
        return Image.open(io.BytesIO(r.read()))


def _pick(driver, css, choice):
    """Choose a Gradio dropdown's option by its label."""
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, f"{css} input").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"[role=option][aria-label='{choice}']"), 30)[0].click()


def _progress_texts(driver) -> list[str]:
    """The progress lines Gradio shows over the outputs ("step 3 of 20 - 15.0%"), read in one script (the
    elements come and go as the page updates)."""
    return driver.execute_script(r"""
        const re = /step \d+ of \d+/, out = [];
        document.querySelectorAll('body *').forEach(e => {
            if (re.test(e.innerText || '') && ![...e.children].some(c => re.test(c.innerText || '')))
                out.push(e.innerText);
        });
        return out;""")


def _watch_progress(driver, done, timeout=300) -> list[str]:
    """Every progress line seen until `done(driver)`."""
    seen = []

    def look(d):
        seen.extend(_progress_texts(d))
        return done(d)
    _wait(driver, look, timeout)
    return seen


def _seed_shown(driver) -> int:
    import re
    return int(re.search(r"seed (\d+)", _result_text(driver)).group(1))


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.mark.slow  # 17-30 s on 2 shared cores (a 50-step request and the CLI); make test-slow
def test_browser_painted_mask_gives_the_clis_image_and_shows_progress(browser, page, tmp_path):
    """Upload the start image, paint over its lower right in the editor, generate: the page shows "step i of n"
    while it runs and n of n at the end, offers the painted mask as a download (white where painted), and the
    image equals `fastsd generate --image --mask` with that mask, pixel for pixel."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    _scene(tmp_path)
    _open(browser, page)
    browser.find_element(By.XPATH, "//*[@id='image_inputs']//button[contains(., 'image-to-image')]").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"), 30)[0].send_keys(
        str(tmp_path / "circle.png"))
    _wait(browser, lambda d: "%" in d.find_element(By.CSS_SELECTOR, "#mask_paint").text, 60)  # the editor shows it
    browser.find_element(By.CSS_SELECTOR, "#mask_paint button[aria-label='Brush']").click()
    canvas = browser.find_element(By.CSS_SELECTOR, "#mask_paint canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, 20, 20).click_and_hold().move_by_offset(50, 0) \
        .move_by_offset(0, 50).release().perform()  # from the image's centre, right and down (CSS pixels)
    prompt = "a yellow square in the bottom right on a blue background"
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt)
    _set(browser, "#steps input[type=number]", 50)  # long enough for the page to see steps go by
    _set(browser, "#seed input", 5)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    progress = _watch_progress(browser, lambda d: "seed 5" in _result_text(d) and d.find_elements(By.CSS_SELECTOR,
                                                                                               "#files a"))
    OUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUT / "ui-page-paint.png"))
    text = _result_text(browser)
    assert "inpainting (strength 0.8)" in text and "painted mask" in text
    import re
    steps = int(re.search(r"(\d+) of \1 steps", text).group(1))  # img2img runs int(50 x 0.8) = 40 of the 50 (pndm: 41)
    assert re.findall(rf"step \d+ of {steps}\b", " ".join(progress)), progress
    mask = _download(browser, "mask.png")
    m = np.asarray(mask.convert("L"))
    assert mask.size == (64, 64) and set(np.unique(m)) == {0, 255}
    assert m[40, 40] == 255 and m[0, 0] == 0  # painted from the centre towards the lower right, not the corner
    mask.save(tmp_path / "painted.png")
    shown = _download(browser, "fastsd-seed5.png")
    assert _same(shown, _cli(tmp_path, prompt, 5, 50, "--image", str(tmp_path / "circle.png"),
                             "--mask", str(tmp_path / "painted.png"), "--strength", "0.8"))


def test_browser_scheduler_lora_weight_and_the_seed_shown_reproduce(browser, page, shapes_deployment, tmp_path):
    """Seed -1, the euler scheduler and LoRA speckle at weight 0.5: the seed the page shows, given to `fastsd
    generate` with the same scheduler and adapter weight, gives the same image, and entered again in the page
    too; the default scheduler or no adapter gives another image."""
    from selenium.webdriver.common.by import By
    _open(browser, page)
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    _set(browser, "#steps input[type=number]", 4)
    _set(browser, "#seed input", -1)
    _pick(browser, "#scheduler", "euler")
    _pick(browser, "#lora", "speckle")
    _set(browser, "#lora_scale input[type=number]", 0.5)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(browser, lambda d: "LoRA speckle:0.5" in _result_text(d) and d.find_elements(By.CSS_SELECTOR, "#files a"))
    seed = _seed_shown(browser)
    first = _download(browser, f"fastsd-seed{seed}.png")
    lora = str(Path(shapes_deployment["lora_dir"]) / "speckle.safetensors")
    assert _same(first, _cli(tmp_path, PROMPT, seed, 4, "--scheduler", "euler", "--lora", f"{lora}:0.5"))
    assert not _same(first, _cli(tmp_path, PROMPT, seed, 4, "--lora", f"{lora}:0.5"))  # the model's scheduler
    assert not _same(first, _cli(tmp_path, PROMPT, seed, 4, "--scheduler", "euler", "--lora", f"{lora}:1"))
    _set(browser, "#seed input", seed)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(browser, lambda d: f"seed {seed}" in _result_text(d) and
          d.find_elements(By.XPATH, f"//*[@id='files']//a[contains(@href, 'seed{seed}')]"))
    _wait(browser, lambda d: _same(_download(d, f"fastsd-seed{seed}.png"), first), 60)


def test_browser_cancel_stops_a_long_job_at_its_next_step(browser, page, shapes_deployment):
    """150 steps, Cancel once the page shows a step: the page says where it stopped, the replica's engine call
    ends long before its 150 steps (its stats count an engine call stopped between steps), and the page
    generates again right after."""
    import json
    import time

    from selenium.webdriver.common.by import By
    stats = shapes_deployment["dir"] / "replica-0.json"

    def stopped() -> int:
        return json.loads(stats.read_text()).get("stats", {}).get("stopped_batches", 0)
    before = stopped()
    _open(browser, page)
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    _set(browser, "#steps input[type=number]", 150)
    _set(browser, "#seed input", 7)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    import re
    _wait(browser, lambda d: [t for t in _progress_texts(d) if re.search(r"step [1-9]\d* of 15\d", t)], 120)  # pndm: 151
    browser.find_element(By.CSS_SELECTOR, "#cancel").click()
    t0 = time.monotonic()
    _wait(browser, lambda d: "cancelled" in _result_text(d), 30)
    assert re.search(r"cancelled at step \d+ of 15\d", _result_text(browser))
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")  # nothing made
    _wait(browser, lambda d: stopped() > before, 30)  # the engine call stopped between steps
    assert time.monotonic() - t0 < 30
    record = json.loads((shapes_deployment["dir"] / "progress-0.json").read_text())
    assert not record.get("busy"), record
    _set(browser, "#steps input[type=number]", 2)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(browser, lambda d: "seed 7" in _result_text(d) and d.find_elements(By.CSS_SELECTOR, "#gallery img"), 120)
