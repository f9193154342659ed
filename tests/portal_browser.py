"""The customer portal and the vendor console in a real browser (Debian's chromium through
chromedriver, driven by selenium), against a control plane and a subscribed sidecar that
tests/portal_browser.rs started. Exits non-zero with the reason on the first failed check.

Arguments come as environment variables: TG_CP (control plane URL), TG_SIDECAR (sidecar URL),
TG_INTEGRATION_KEY, TG_ADMIN_KEY, TG_SCREENSHOTS (a directory for one PNG per page),
TG_CHROMIUM and TG_CHROMEDRIVER (binaries).
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.support.ui import Select, WebDriverWait


def waiting(driver, seconds=10):
    """A wait that retries while the page is being replaced (a form post navigating away)."""
    return WebDriverWait(driver, seconds, ignored_exceptions=[StaleElementReferenceException])

CP = os.environ["TG_CP"]
SIDECAR = os.environ["TG_SIDECAR"]
INTEGRATION = os.environ["TG_INTEGRATION_KEY"]
ADMIN = os.environ["TG_ADMIN_KEY"]
SHOTS = os.environ["TG_SCREENSHOTS"]


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def call(method, url, key=None, body=None):
    """(status, parsed JSON or text) of one HTTP call."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if key:
        request.add_header("Authorization", "Bearer " + key)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def link(account, user):
    status, answer = call("POST", CP + "/v1/portal/sessions", INTEGRATION,
                          {"account": account, "user": user, "return_url": "https://app.planwise.example/settings"})
    check(status == 200, f"portal session: {status} {answer}")
    return answer["url"]


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ["TG_CHROMIUM"]
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--force-device-scale-factor=1"]:
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(os.environ["TG_CHROMEDRIVER"]), options=options)


def shoot(driver, name):
    """A full-page screenshot: the window grows to the page's height first."""
    width = driver.get_window_size()["width"]
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height + 120, 600), 4000))
    driver.save_screenshot(os.path.join(SHOTS, name + ".png"))
    driver.set_window_size(width, 1000)


def text(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).text


def wait_for(driver, css):
    waiting(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


def seats_of(driver):
    return text(driver, "#seats")


def main():
    driver = browser()
    try:
        run(driver)
    finally:
        driver.quit()


def run(driver):
    portal = CP + "/portal/accounts/acme"

    # A customer follows a fresh link: the entry page moves on to the overview by itself.
    first_link = link("acme", "alice")
    driver.get(first_link)
    waiting(driver).until(lambda d: d.current_url.rstrip("/") == portal)
    check(text(driver, "#plan") == "team", f"plan shown: {text(driver, '#plan')!r}")
    check("valid" in text(driver, "#license-state"), text(driver, "#license-state"))
    shoot(driver, "portal-overview")

    # The usage chart's numbers are the API's numbers.
    driver.get(portal + "/usage")
    status, usage = call("GET", CP + "/v1/accounts/acme/usage?history=11", INTEGRATION)
    check(status == 200, f"usage API: {status} {usage}")
    rows = [row for row in usage["meters"] if row["meter"] == "api_calls"]
    section = driver.find_element(By.ID, "meter-api_calls")
    current = rows[0]
    check(int(section.get_attribute("data-used")) == current["used"],
          f"current period: page {section.get_attribute('data-used')}, API {current['used']}")
    check(section.get_attribute("data-limit") == str(current["limit"]), "limit differs from the API")
    bars = {bar.get_attribute("data-label"): int(bar.get_attribute("data-value"))
            for bar in section.find_elements(By.CSS_SELECTOR, "svg rect")}
    check(len(bars) == 12, f"12 periods charted, got {len(bars)}")
    for row in rows:
        label = row["period_start"][:7]
        check(bars.get(label) == row["used"], f"period {label}: chart {bars.get(label)}, API {row['used']}")
    check(sum(bars.values()) == sum(row["used"] for row in rows), f"chart {bars} holds usage the API does not: {rows}")
    check("close to the limit" in section.text, "no near-limit warning at " + str(current["used"]))
    shoot(driver, "portal-usage")

    driver.get(portal + "/features")
    sso = driver.find_element(By.ID, "feature-sso")
    check("denied" in sso.text and "Not included" in sso.text, sso.text)
    check(sso.find_element(By.LINK_TEXT, "Upgrade to business").get_attribute("href").startswith("https://billing.planwise.example/"),
          "no checkout link")
    shoot(driver, "portal-features")

    # Adding a user changes the seat count.
    driver.get(portal + "/users")
    check(seats_of(driver) == "2 of 5", seats_of(driver))
    driver.find_element(By.ID, "user").send_keys("dana@acme.example")
    Select(driver.find_element(By.ID, "roles")).select_by_value("member")
    driver.find_element(By.CSS_SELECTOR, "#add-user button[type=submit]").click()
    wait_for(driver, ".done")
    check(seats_of(driver) == "3 of 5", "seats after adding: " + seats_of(driver))
    check(driver.find_elements(By.ID, "user-dana@acme.example"), "dana is not listed")
    shoot(driver, "portal-users")

    driver.get(portal + "/devices")
    shoot(driver, "portal-devices")
    driver.get(portal + "/token")
    check(driver.find_element(By.ID, "token").get_attribute("value").count(".") == 2, "no JWT on the token page")
    shoot(driver, "portal-token")

    # Alice asks for SSO.
    driver.get(portal + "/features")
    driver.find_element(By.ID, "feature-sso").find_element(By.LINK_TEXT, "Request access").click()
    wait_for(driver, "#request-access")
    check(Select(driver.find_element(By.ID, "what")).first_selected_option.get_attribute("value") == "feature:sso", "sso not preselected")
    driver.find_element(By.ID, "reason").send_keys("We are rolling out SAML for the whole team.")
    driver.find_element(By.CSS_SELECTOR, "#request-access button[type=submit]").click()
    wait_for(driver, ".done")
    pending = driver.find_elements(By.CSS_SELECTOR, "tr[id^=request-] .status")
    check(pending and pending[0].text == "pending", "request not listed as pending")
    request_id = driver.find_elements(By.CSS_SELECTOR, "tr[id^=request-]")[0].get_attribute("id").split("-")[1]
    shoot(driver, "portal-requests")

    # Refused: a reused link, another account's pages, a form without its CSRF token.
    status, _ = call("GET", first_link)
    check(status == 410, f"reused link answered {status}")
    driver.get(first_link)
    check("already been used" in driver.find_element(By.TAG_NAME, "body").text, "reused link page")
    shoot(driver, "portal-link-reused")
    driver.get(CP + "/portal/accounts/globex/users")
    body = driver.find_element(By.TAG_NAME, "body").text
    check("belongs to another account" in body and "gina" not in body, "cross-account page: " + body)
    driver.get(portal + "/users")
    driver.execute_script("document.querySelector('#add-user input[name=csrf]').remove()")
    driver.find_element(By.ID, "user").send_keys("mallory@acme.example")
    driver.find_element(By.CSS_SELECTOR, "#add-user button[type=submit]").click()
    waiting(driver).until(lambda d: "security token" in d.find_element(By.TAG_NAME, "body").text)
    status, account = call("GET", CP + "/v1/accounts/acme", ADMIN)
    check("mallory@acme.example" not in account["state"]["users"], "a form without its token changed the account")

    # On a phone.
    driver.set_window_size(390, 844)
    driver.get(portal)
    driver.save_screenshot(os.path.join(SHOTS, "portal-phone.png"))
    driver.set_window_size(1280, 1000)

    # The vendor's admin approves it in the console.
    driver.get(CP + "/console")
    driver.find_element(By.ID, "person").send_keys("carol@planwise.example")
    driver.find_element(By.ID, "key").send_keys(ADMIN)
    driver.find_element(By.CSS_SELECTOR, "#signin button").click()
    wait_for(driver, "#search")
    driver.find_element(By.ID, "q").send_keys("ac")
    driver.find_element(By.CSS_SELECTOR, "#search button").click()
    wait_for(driver, "#results li")
    shoot(driver, "console-search")
    driver.find_element(By.LINK_TEXT, "acme").click()
    wait_for(driver, ".stats")
    shoot(driver, "console-account")

    check_before = call("POST", SIDECAR + "/v1/check", body={"account": "acme", "feature": "sso", "user": "alice"})[1]
    check(check_before["allow"] is False, f"sso allowed before approval: {check_before}")
    driver.get(CP + "/console/requests")
    card = driver.find_element(By.ID, "request-" + request_id)
    card.find_element(By.NAME, "comment").send_keys("Approved for the SAML rollout.")
    shoot(driver, "console-requests")
    card.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
    wait_for(driver, ".done")
    approved_at = time.monotonic()
    while True:
        answer = call("POST", SIDECAR + "/v1/check", body={"account": "acme", "feature": "sso", "user": "alice"})[1]
        elapsed = time.monotonic() - approved_at
        if answer.get("allow"):
            break
        check(elapsed < 1.0, f"the sidecar still denies sso {elapsed:.3f} s after the approval: {answer}")
        time.sleep(0.01)
    print(f"sidecar allowed sso {elapsed * 1000:.0f} ms after the approval page loaded")

    for page in ["analytics", "export", "webhooks"]:
        driver.get(CP + "/console/" + page)
        wait_for(driver, "main section")
        shoot(driver, "console-" + page)

    # The customer sees the decision.
    driver.get(portal + "/requests")
    check(text(driver, f"#request-{request_id} .status") == "approved", "decision not shown in the portal")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
    print("portal browser walk-through passed")
