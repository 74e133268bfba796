"""Drive Sagaflow's web page in headless Chromium (Debian's chromium + chromedriver, Selenium
from PyPI): the list shows the sagas, a saga's timeline shows its steps and inputs, and the
Abort button compensates a waiting saga. Saves a screenshot.

Usage: ui_test.py <page url> <api token> <id of a waiting saga> <screenshot path>
"""

import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

url, token, waiting, shot = sys.argv[1:5]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    # The page re-renders its tables and header on every refresh, so an element found a moment
    # ago may be gone: every wait looks elements up again and ignores stale references.
    wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))

    def click(selector):
        """Click the element the selector names, looking it up again if a re-render replaced it."""
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, selector).click() or True)

    def rows_of(selector):
        """The texts of the rows the selector names, read in one go (a re-render retries)."""
        return wait.until(lambda d: [r.text for r in d.find_elements(By.CSS_SELECTOR, selector)] or None)

    driver.get(f"{url}#token={token}")
    rows = wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) >= 2 and d.find_elements(By.CSS_SELECTOR, "tr.saga"))
    print(f"ui: list shows {len(rows)} sagas")
    # filter by status
    driver.find_element(By.ID, "status").send_keys("completed")
    click("#filters button")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) == 1)
    print("ui: the status filter narrows the list")
    driver.find_element(By.ID, "status").send_keys("any")
    click("#filters button")
    click(f"tr.saga[data-id='{waiting}']")
    wait.until(ec.text_to_be_present_in_element((By.ID, "saga-status"), "running"))
    steps = rows_of("#steps tbody tr")
    timeline = rows_of("#timeline tbody tr")
    assert len(steps) == 2, f"{len(steps)} steps"
    assert "waiting" in steps[1], steps[1]
    assert len(timeline) >= 2 and "start" in timeline[0], timeline
    print(f"ui: timeline shows {len(timeline)} inputs")
    click("button[data-action='abort']")
    wait.until(lambda d: d.find_element(By.ID, "saga-status").text in ("compensating", "compensated"))
    click(f"tr.saga[data-id='{waiting}']")
    wait.until(ec.text_to_be_present_in_element((By.ID, "saga-status"), "compensated"))
    print("ui: aborted")
    driver.save_screenshot(shot)
    print(f"ui: screenshot {shot}")
finally:
    driver.quit()
