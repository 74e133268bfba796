"""Drive Sagaflow's web page in headless Chromium (Debian's chromium + chromedriver, Selenium
from PyPI): a saga's own address opens it directly (and the token leaves the address), the
overview shows the counts the API gives, the back and forward buttons move between views, the
list shows the sagas, a saga's timeline shows its steps and inputs, and the Abort button
compensates a waiting saga; then every stopped saga is retried at once (previewed, confirmed).
Saves two screenshots: the saga (at the path given) and the overview (beside it, -overview.png).

Then a parent saga's step links to its child saga, and the child back to its parent.

Usage: ui_test.py <page url> <api token> <id of a waiting saga> <screenshot path> <stopped sagas>
                  <id of a completed saga with a child saga>
"""

import json
import sys
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

url, token, waiting, shot = sys.argv[1:5]
stopped = int(sys.argv[5])
family = sys.argv[6]
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

    # A deep link: the saga's own address, opened directly.
    driver.get(f"{url}#/saga/{waiting}?token={token}")
    wait.until(ec.text_to_be_present_in_element((By.ID, "saga-status"), "running"))
    assert driver.find_element(By.ID, "detail").get_attribute("data-id") == waiting
    assert "token" not in driver.current_url and driver.current_url.endswith(f"#/saga/{waiting}"), driver.current_url
    print("ui: a saga's address opens it; the token leaves the address")

    # The overview shows what the API says.
    req = urllib.request.Request(url.rstrip("/") + "/overview", headers={"authorization": f"Bearer {token}"})
    api = json.load(urllib.request.urlopen(req))
    want = {f"{c['definition']}/{c['version']}/{c['status']}": str(c["count"]) for c in api["open"]}
    shown = wait.until(lambda d: {r.get_attribute("data-key"): r.find_element(By.CSS_SELECTOR, "td.n").text
                                  for r in d.find_elements(By.CSS_SELECTOR, "#ov-open tr[data-key]")} or None)
    assert shown == want, (shown, want)
    completed = sum(c["count"] for c in api["last_hour"] if c["status"] == "completed")
    wait.until(lambda d: d.find_element(By.ID, "ov-hour").get_attribute("data-completed") == str(completed))
    print(f"ui: the overview shows the API's counts: open {want}, completed in the last hour {completed}")

    click("h1 a")
    rows = wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) >= 2 and d.find_elements(By.CSS_SELECTOR, "tr.saga"))
    assert driver.find_element(By.ID, "detail").get_attribute("hidden") is not None
    print(f"ui: list shows {len(rows)} sagas")
    # filter by status: an address of its own, and back
    # By value: typing into a <select> picks by type-ahead, which a slow key stream resets
    # (and `comp…` matches three statuses).
    req = urllib.request.Request(url.rstrip("/") + "/sagas?status=completed", headers={"authorization": f"Bearer {token}"})
    completed_now = len(json.load(urllib.request.urlopen(req))["items"])
    assert 0 < completed_now < len(rows), (completed_now, len(rows))
    Select(driver.find_element(By.ID, "status")).select_by_visible_text("completed")
    click("#filters button")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) == completed_now)
    assert "status=completed" in driver.current_url, driver.current_url
    print("ui: the status filter narrows the list")
    driver.back()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) >= 2)
    assert driver.find_element(By.ID, "status").get_attribute("value") == ""
    # search by a business key (the definition's search key `case`)
    driver.find_element(By.ID, "key").send_keys("case=o-42")
    click("#filters button")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) == 1)
    assert "key=case%3Do-42" in driver.current_url, driver.current_url
    print("ui: found by its search key")
    driver.back()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) >= 2)
    assert driver.find_element(By.ID, "key").get_attribute("value") == ""
    click(f"tr.saga[data-id='{waiting}']")
    wait.until(ec.text_to_be_present_in_element((By.ID, "saga-status"), "running"))
    driver.back()
    wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("hidden") is not None)
    driver.forward()
    wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("hidden") is None)
    wait.until(ec.text_to_be_present_in_element((By.ID, "saga-status"), "running"))
    print("ui: back and forward move between the list and a saga")
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
    # The timeline's bars, in time order: the step's command, the wait, then the step's undo.
    segs = wait.until(lambda d: sorted(
        (int(b.get_attribute("data-start")), int(b.get_attribute("data-end")), b.get_attribute("data-step"),
         b.get_attribute("data-kind"), b.get_attribute("data-outcome"))
        for b in d.find_elements(By.CSS_SELECTOR, "#bars .seg")) or None)
    assert [g[2:] for g in segs] == [("a", "invoke", "success"), ("approved", "wait", "cancelled"), ("a", "compensate", "success")], segs
    assert segs[0][1] <= segs[2][0] and all(g[0] <= g[1] for g in segs), segs
    sizes = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#timeline details summary")]
    assert sizes and all(t.endswith(" B") for t in sizes), sizes
    print(f"ui: the timeline's bars: {[g[2:] for g in segs]}")
    driver.save_screenshot(shot)
    print(f"ui: screenshot {shot}")

    # Bulk: every stopped saga retried at once, previewed first and confirmed.
    click("h1 a")
    wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("hidden") is not None)
    Select(driver.find_element(By.ID, "status")).select_by_visible_text("stopped")
    click("#filters button")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) == stopped)
    wait.until(lambda d: any(f"compensation_failed" in r.text and r.text.endswith(str(stopped))
                             for r in d.find_elements(By.CSS_SELECTOR, "#ov-stopped tr")))
    driver.save_screenshot(shot.replace(".png", "-overview.png"))
    Select(driver.find_element(By.ID, "bulk-action")).select_by_visible_text("retry")
    Select(driver.find_element(By.ID, "bulk-stop-code")).select_by_visible_text("compensation_failed")
    click("#bulk-preview")
    wait.until(lambda d: d.find_element(By.ID, "bulk-result").get_attribute("data-matched") == str(stopped))
    click("#bulk-apply")
    wait.until(ec.alert_is_present())
    driver.switch_to.alert.accept()
    wait.until(lambda d: d.find_element(By.ID, "bulk-result").get_attribute("data-applied") == str(stopped))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.saga")) == 0)
    print(f"ui: bulk retried {stopped} stopped sagas")

    # A parent's child step links to its child saga, which links back.
    driver.get(f"{url}#/saga/{family}")
    wait.until(ec.text_to_be_present_in_element((By.ID, "saga-status"), "completed"))
    click("#steps a.saga-link")
    wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("data-id") != family)
    wait.until(ec.text_to_be_present_in_element((By.ID, "title"), "pair v1"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "summary"), "child saga of family (step kid)"))
    click("#summary a.saga-link")
    wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("data-id") == family)
    print("ui: a child saga links to its parent and back")
finally:
    driver.quit()
