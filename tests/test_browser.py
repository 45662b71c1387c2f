"""The built book in a real browser: the forward-process chapter's timestep slider works with no kernel.

The book is built with ``jupyter-book build -W -n --keep-going`` into a temporary copy, so the
checkout's ``book/_build`` is left alone. Whether that build is free of warnings is checked
elsewhere; this test needs only the chapter's page. It runs headless Chromium through
selenium with the system's ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` and never
downloads a browser or a driver.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
BOOK = REPOSITORY / "book"
PAGE = Path("chapters") / "02_forward_process.html"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BUILD_SECONDS = 1200


@pytest.fixture(scope="session")
def built_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The forward-process chapter's HTML page, from a fresh build of a copy of the book."""
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    if not jupyter_book.exists():
        found = shutil.which("jupyter-book")
        if found is None:
            pytest.skip('jupyter-book is not installed; install it with pip install -e ".[book]"')
        jupyter_book = Path(found)
    needed = ["_config.yml", "_toc.yml", "chapters/02_forward_process.ipynb"]
    missing = [name for name in needed if not (BOOK / name).exists()]
    if missing:
        pytest.skip(f"the book cannot be built yet: book/{', book/'.join(missing)} missing")
    copy = tmp_path_factory.mktemp("browser") / "book"
    shutil.copytree(BOOK, copy, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    result = subprocess.run(
        [str(jupyter_book), "build", str(copy), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=BUILD_SECONDS,
    )
    page = copy / "_build" / "html" / PAGE
    if not page.exists():
        pytest.fail(
            f"jupyter-book build (exit code {result.returncode}) did not write {PAGE}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return page


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium driven by the system's chromedriver (selenium-manager is not used)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(
            f"headless Chromium is needed: {CHROMIUM} or {CHROMEDRIVER} is missing; "
            "install them with `apt-get install chromium chromium-driver`"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason='selenium is missing: pip install -e ".[test]"'
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _frame_source(driver: object, image_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).src;", image_id)


def _move_slider(driver: object, slider: object, value: int) -> None:
    """Set the range input's value as a user's drag would, firing its input and change events."""
    driver.execute_script(
        """
        const slider = arguments[0];
        slider.value = arguments[1];
        slider.dispatchEvent(new Event('input', {bubbles: true}));
        slider.dispatchEvent(new Event('change', {bubbles: true}));
        """,
        slider,
        value,
    )


@pytest.mark.browser
@pytest.mark.slow
def test_static_timestep_slider_changes_the_displayed_frame(
    built_page: Path, browser: object
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(built_page.as_uri())
    wait = WebDriverWait(browser, 30)
    slider = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=range].anim-slider"))
    image_id = slider.get_attribute("id").replace("_anim_slider", "_anim_img")
    # The animation fills in its first frame from a timer once the page has loaded.
    wait.until(lambda d: _frame_source(d, image_id).startswith("data:image/png;base64,"))
    last = int(slider.get_attribute("max"))
    assert last >= 1, "the slider should hold several frames"
    first_frame = _frame_source(browser, image_id)

    _move_slider(browser, slider, last)
    wait.until(lambda d: _frame_source(d, image_id) != first_frame)
    last_frame = _frame_source(browser, image_id)
    assert last_frame.startswith("data:image/png;base64,")
    assert slider.get_attribute("value") == str(last)

    # The animation's own buttons step through the same frames.
    browser.find_element(By.CSS_SELECTOR, "button[title='First frame']").click()
    wait.until(lambda d: _frame_source(d, image_id) == first_frame)
    browser.find_element(By.CSS_SELECTOR, "button[title='Next frame']").click()
    wait.until(lambda d: _frame_source(d, image_id) not in (first_frame, last_frame))
    assert slider.get_attribute("value") == "1"
