"""The annotation web app in a real browser: Debian's Chromium driven by Selenium (headless).

Against the served app (the ``web_server`` fixture of this folder's conftest): an annotator signs
in, judges three items with the keyboard only and undoes the last; the feedback log must then hold
exactly those judgements and revisions. A question with ``<script>`` renders as text, a form
posted without its CSRF token is refused, and an annotator of namespace B never sees A's items.
Screenshots of the judging and admin pages go to docs/images/ when ``ILLUME_WEB_SCREENSHOTS=1``
(else to the test's temporary folder).

The fixture contract: ``web_server.base_url`` (``http://127.0.0.1:PORT``), ``.keys`` (role ->
key: "annotator" and "annotator_b", scoped to ``.namespace_a`` and ``.namespace_b``, and "admin",
allowed ``.namespace_a``), ``.store`` (a ``FeedbackStore`` on the server's database) and
``.seed_generations(namespace, questions) -> generation ids``, which stores one logged generation
per question, each with its own image and at least one candidate. The two namespaces hold only
what this module seeds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from illume.store import schema as s

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_IMAGES = Path(__file__).resolve().parents[3] / "docs" / "images"
XSS_QUESTION = "Is there a <script>alert(1)</script> in the picture?"
A_QUESTIONS = ["What colour is the square?", XSS_QUESTION, "Is the picture bright?"]
B_QUESTIONS = ["Only tenant B asks this?"]
CORRECTION = "the sun is shining, 1 2 3"  # shortcut letters and digits, typed as text
WAIT_S = 15

BROWSER_MISSING = (
    "needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
    "make browser-deps (make test runs it)"
)


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    """Skip without the browser on a developer's machine; fail in CI, where make test installs it."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(BROWSER_MISSING)
    pytest.skip(BROWSER_MISSING)


@dataclass(frozen=True)
class Seeded:
    a: list[str]
    b: list[str]


@pytest.fixture(scope="module")
def seeded(web_server: Any) -> Seeded:
    return Seeded(
        a=web_server.seed_generations(web_server.namespace_a, A_QUESTIONS),
        b=web_server.seed_generations(web_server.namespace_b, B_QUESTIONS),
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("ILLUME_WEB_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        return DOCS_IMAGES
    return tmp_path_factory.mktemp("web-screenshots")


# -- browser helpers -------------------------------------------------------------------------------


def by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def wait(browser: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_S)


def sign_in(browser: Any, web_server: Any, role: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{web_server.base_url}/sign-in")
    field = browser.find_element(by("ID"), "api-key")
    field.send_keys(web_server.keys[role])
    field.submit()
    wait(browser).until(lambda b: "/sign-in" not in b.current_url)


def press(browser: Any, *keys: str) -> None:
    """Type ``keys`` to the page itself (the body), as a person without a mouse would."""
    body = browser.find_element(by("TAG_NAME"), "body")
    for key in keys:
        body.send_keys(key)


def generation_on_page(browser: Any) -> str | None:
    forms = browser.find_elements(by("ID"), "judge-form")
    return forms[0].get_attribute("data-generation-id") if forms else None


def submit_and_wait(browser: Any, *keys: str) -> None:
    """Press ``keys`` (the last one submits) and wait for the next page after the redirect."""
    from selenium.webdriver.support import expected_conditions as ec

    form = browser.find_element(by("ID"), "judge-form")
    press(browser, *keys)
    wait(browser).until(ec.staleness_of(form))
    wait(browser).until(lambda b: b.execute_script("return document.readyState") == "complete")


def candidate_ids(browser: Any) -> list[str]:
    return [
        li.get_attribute("data-candidate-id")
        for li in browser.find_elements(by("CSS_SELECTOR"), "li.candidate")
    ]


def assert_no_alert(browser: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is what raises


def feedback_log(store: Any, generation_ids: list[str]) -> dict[str, list[tuple]]:
    """Every stored revision per generation: (revision, verdict, answer_correct, fitting, ratings,
    correction), oldest first."""
    f, items, corrections = s.feedback, s.feedback_items, s.corrections
    with store.engine.connect() as conn:
        rows = conn.execute(select(f).where(f.c.generation_id.in_(generation_ids)).order_by(f.c.seq)).all()
        ids = [row.feedback_id for row in rows]
        item_rows = conn.execute(select(items).where(items.c.feedback_id.in_(ids))).all()
        texts = dict(conn.execute(select(corrections.c.feedback_id, corrections.c.text)).all())
    log: dict[str, list[tuple]] = {gid: [] for gid in generation_ids}
    for row in rows:
        mine = [i for i in item_rows if i.feedback_id == row.feedback_id]
        log[row.generation_id].append(
            (
                row.revision,
                row.verdict,
                row.answer_correct,
                frozenset(i.candidate_id for i in mine if i.fitting),
                {i.candidate_id: i.rating for i in mine if i.rating is not None},
                texts.get(row.feedback_id, ""),
            )
        )
    return log


# -- the tests -------------------------------------------------------------------------------------


def test_judge_three_items_with_the_keyboard_and_undo_one(
    web_server: Any, seeded: Seeded, browser: Any, screenshot_dir: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    sign_in(browser, web_server, "annotator")
    browser.get(f"{web_server.base_url}/judge?namespace={web_server.namespace_a}")
    expected: dict[str, list[tuple]] = {}
    seen_questions = []
    for step in range(3):
        gid = generation_on_page(browser)
        assert gid in seeded.a, f"step {step}: the page shows {gid!r}, not one of namespace A's items"
        question = A_QUESTIONS[seeded.a.index(gid)]
        assert browser.find_element(by("ID"), "question").text == question
        seen_questions.append(question)
        if question == XSS_QUESTION:
            # The markup is text on the page: no script element holds it and nothing ran.
            assert not browser.find_elements(by("XPATH"), "//script[contains(., 'alert')]")
            assert_no_alert(browser)
        cids = candidate_ids(browser)
        assert cids, "an item without candidates"
        if step == 0:
            browser.save_screenshot(str(screenshot_dir / "web-judge.png"))
            # 1 and 3 toggle the first and third candidate; pressing 3 twice leaves it unchecked
            # when there is no third (then only the first fits).
            keys = ["1", "3"] if len(cids) >= 3 else ["1"]
            submit_and_wait(browser, *keys, Keys.ENTER)
            expected[gid] = [(1, "selected", True, frozenset(cids[int(k) - 1] for k in keys), {}, "")]
        elif step == 1:
            # The second candidate (the first when alone) fits and is rated 3; the answer is wrong.
            index = 1 if len(cids) >= 2 else 0
            submit_and_wait(browser, str(index + 1), "r", "3", "a", Keys.ENTER)
            expected[gid] = [(1, "selected", False, frozenset({cids[index]}), {cids[index]: 3}, "")]
        else:
            # C opens the correction box; what is typed there is text, Esc closes it; N: none fits.
            press(browser, "c")
            box = browser.switch_to.active_element
            assert box.get_attribute("id") == "correction"
            box.send_keys(CORRECTION)
            box.send_keys(Keys.ESCAPE)
            assert generation_on_page(browser) == gid  # nothing typed in the box submitted the form
            assert not browser.find_element(by("ID"), "correction-box").get_attribute("open")
            submit_and_wait(browser, "n")
            expected[gid] = [(1, "none_fit", True, frozenset(), {}, CORRECTION)]
            undone = gid
    assert sorted(seen_questions) == sorted(A_QUESTIONS)
    assert (
        browser.find_element(by("ID"), "nothing-left").text
        == f"Nothing left to judge in {web_server.namespace_a}"
    )

    # U withdraws the last judgement (a skipped revision) and shows that item again.
    old_page = browser.find_element(by("TAG_NAME"), "main")
    press(browser, "u")
    from selenium.webdriver.support import expected_conditions as ec

    wait(browser).until(ec.staleness_of(old_page))
    assert generation_on_page(browser) == undone
    assert "Withdrew your last judgement" in browser.find_element(by("ID"), "flash").text
    expected[undone].append((2, "skipped", None, frozenset(), {}, ""))

    assert feedback_log(web_server.store, seeded.a) == expected
    annotators = {
        j.annotator_id
        for gid in seeded.a
        for j in web_server.store.get_generation(gid, web_server.namespace_a).judgements
    }
    assert len(annotators) == 1


def test_a_form_without_its_csrf_token_is_refused(web_server: Any, seeded: Seeded, browser: Any) -> None:
    sign_in(browser, web_server, "annotator")
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    assert "illume_session" in cookies
    gid = seeded.a[0]
    candidate = web_server.store.get_generation(gid, web_server.namespace_a).candidates[0].candidate_id
    before = feedback_log(web_server.store, seeded.a)
    form = {
        "namespace": web_server.namespace_a,
        "generation_id": gid,
        "idempotency_key": "no-csrf-0123456789",
        "fitting": candidate,
        "verdict": "submit",
    }
    with httpx.Client(base_url=web_server.base_url, cookies=cookies) as client:
        refused = client.post("/judge/submit", data=form)
        assert refused.status_code == 403 and "missing or invalid CSRF token" in refused.text
        forged = client.post("/judge/submit", data={**form, "csrf_token": "0" * 64})
        assert forged.status_code == 403
        # The same cookie still works: the refusal was the token's.
        assert client.get(f"/judge?namespace={web_server.namespace_a}").status_code == 200
    assert feedback_log(web_server.store, seeded.a) == before


def test_an_annotator_of_b_never_sees_a(web_server: Any, seeded: Seeded, browser: Any) -> None:
    sign_in(browser, web_server, "annotator_b")
    shown = generation_on_page(browser)  # sign-in lands on the key's namespace: B
    assert shown in seeded.b
    assert browser.find_element(by("ID"), "question").text == B_QUESTIONS[0]
    browser.get(f"{web_server.base_url}/judge?namespace={web_server.namespace_b}")
    assert generation_on_page(browser) in seeded.b
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    a_image = web_server.store.get_generation(seeded.a[0], web_server.namespace_a).image_sha256
    with httpx.Client(base_url=web_server.base_url, cookies=cookies) as client:
        assert client.get(f"/judge?namespace={web_server.namespace_a}").status_code == 403
        assert client.get(f"/images/{a_image}?namespace={web_server.namespace_a}").status_code == 403
        # Images are stored by hash: naming B does not reach an image only A holds.
        assert client.get(f"/images/{a_image}?namespace={web_server.namespace_b}").status_code == 404
        b_image = web_server.store.get_generation(seeded.b[0], web_server.namespace_b).image_sha256
        image = client.get(f"/images/{b_image}?namespace={web_server.namespace_b}")
        assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    assert browser.find_elements(by("LINK_TEXT"), "Admin") == []


def test_admin_page(web_server: Any, seeded: Seeded, browser: Any, screenshot_dir: Path) -> None:
    sign_in(browser, web_server, "admin")
    browser.get(f"{web_server.base_url}/admin?namespace={web_server.namespace_a}")
    assert browser.find_element(by("TAG_NAME"), "h1").text == f"Admin · {web_server.namespace_a}"
    assert browser.find_elements(by("CSS_SELECTOR"), "#plot svg circle.point.acceptance")
    assert "web-annotator-a" in browser.find_element(by("ID"), "annotators").text
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1366, min(max(height + 120, 900), 4000))  # the whole page in one picture
    browser.save_screenshot(str(screenshot_dir / "web-admin.png"))
    browser.set_window_size(1366, 900)
    assert (screenshot_dir / "web-admin.png").stat().st_size > 0
