"""The dashboard in a real browser: Playwright driving Debian's Chromium against a real `ballast up` with real
replica processes. Sign in; watch a deployment go ready; send traffic and see the charts move; promote with the
button; revoke a key and see it stop working; find a request by id in the logs; read-only keys; CSRF; axe-core
accessibility checks. Screenshots go to test-artifacts/dashboard/ (or $BALLAST_TEST_ARTIFACTS).

The tests share one platform and one signed-in page, and run in file order.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
_CANDIDATES = ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
CHROMIUM = next((p for p in _CANDIDATES if p and os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium)")
expect = sync_api.expect

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
ARTIFACTS = Path(os.environ.get("BALLAST_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "dashboard"
MODEL = """
import logging


class Model:
    def predict(self, inputs):
        logging.getLogger("work").info("handled %s", inputs)
        return {"version": VERSION}
"""


def _package(root: Path, version: int) -> Path:
    return write_package(root / f"work-v{version}", "name: work\n", MODEL.replace("VERSION", str(version)))


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("dash")
    p = Platform(root / "home")
    p.env["BALLAST_METRICS_INTERVAL_S"] = "1"
    p.start()
    p.root = root  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser: Any, plat: Platform) -> Iterator[Any]:
    ctx = browser.new_context(base_url=plat.url, viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    pg.on("dialog", lambda d: d.accept())  # the confirmation of every action
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    ctx.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def axe_violations(browser: Any, plat: Platform, cookies: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on a page (its script is injected, so CSP is bypassed here only)."""
    ctx = browser.new_context(base_url=plat.url, bypass_csp=True)
    try:
        ctx.add_cookies(cookies)
        pg = ctx.new_page()
        pg.goto(path)
        pg.add_script_tag(path=str(AXE))
        result = pg.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations")
        return [{"id": v["id"], "impact": v["impact"], "nodes": [n["html"] for n in v["nodes"]][:3]}
                for v in result if v["impact"] in ("serious", "critical")]
    finally:
        ctx.close()


def predict(plat: Platform, key: str, **headers: str) -> httpx.Response:
    return httpx.post(plat.url + "/deployments/work/predict", json={"x": 1}, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **headers})


def test_sign_in(page: Any, plat: Platform) -> None:
    page.goto("/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill("bk_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.get_by_label("API key").fill(plat.key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Deployments")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "ballast_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and plat.key not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # not readable by scripts


def test_watch_a_deployment_go_ready(page: Any, plat: Platform) -> None:
    page.goto("/")
    expect(page.get_by_text("No deployments yet")).to_be_visible()
    plat.api("POST", "/deployments", expect=201, json={"path": str(_package(plat.root, 1))})  # type: ignore[attr-defined]
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="work"))
    expect(row).to_be_visible()  # polled in, no reload
    expect(row.get_by_text("healthy")).to_be_visible(timeout=90_000)
    expect(page.get_by_text("No deployments yet")).to_have_count(0)
    expect(row).to_contain_text("1 / 1")
    expect(row).to_contain_text("production → v1")
    shot(page, "deployments")


def _chart(page: Any, title: str) -> Any:
    return page.get_by_role("figure").filter(has_text=title).get_by_role("img")


def test_traffic_moves_the_charts(page: Any, plat: Platform) -> None:
    page.goto("/ui/deployments/work")
    chart = _chart(page, "Requests/s by status")
    expect(chart).to_have_attribute("data-points", re.compile(r"[1-9]"))
    before = float(chart.get_attribute("data-total"))
    for _ in range(20):
        assert predict(plat, plat.key).status_code == 200
    page.wait_for_function(
        "([sel, before]) => { const e = document.querySelector(sel); return e && +e.dataset.total > before; }",
        arg=["#charts figure:first-child [role=img]", before], timeout=30_000)
    expect(chart).to_have_attribute("aria-label", re.compile(r"requests_2xx latest [0-9.]+ peak [1-9]"))
    latency = re.compile(r"latency_p50 latest [0-9.e-]+ peak 0?\.?[0-9]")
    expect(_chart(page, "Latency, end to end")).to_have_attribute("aria-label", latency)
    expect(_chart(page, "Replicas")).to_have_attribute("aria-label", re.compile(r"replicas_ready latest 1 "))
    page.get_by_role("button", name="1h").click()
    expect(page.get_by_role("button", name="1h")).to_have_attribute("aria-pressed", "true")
    assert page.locator("canvas").count() >= 10 and not page.errors
    shot(page, "deployment")


def test_promote_with_the_button(page: Any, plat: Platform) -> None:
    out = plat.api("POST", "/deployments", expect=201,  # to staging first: it starts replicas of v2
                   json={"path": str(_package(plat.root, 2)), "env": "staging"})  # type: ignore[attr-defined]
    assert out["version"] == 2
    plat.wait("v2 ready", lambda: any(v["number"] == 2 and v["replicas"]["ready"]
                                      for v in plat.show("work")["versions"]), timeout=90)
    page.goto("/ui/deployments/work")
    page.get_by_role("button", name="Promote v2").click()
    expect(page.get_by_role("status")).to_contain_text("v2 → production")
    envs = page.get_by_role("table", name="Environments")
    expect(envs.get_by_role("row").filter(has_text="production")).to_contain_text("v2: 100%")
    assert predict(plat, plat.key).json() == {"version": 2}
    events = plat.api("GET", "/deployments/work/events")["data"]
    assert any(e["kind"].startswith("promote") and "(dashboard)" in (e["actor"] or "") for e in events)


def test_revoke_a_key_and_it_stops_working(page: Any, plat: Platform) -> None:
    page.goto("/ui/keys")
    page.get_by_label("Name").fill("browser-made")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-secret").inner_text().strip()
    assert secret.startswith("bk_") and predict(plat, secret).status_code == 200
    page.goto("/ui/keys")
    assert secret not in page.content()  # shown once
    page.get_by_role("button", name="Revoke browser-made").click()
    expect(page.get_by_role("status")).to_contain_text("revoked browser-made")
    r = predict(plat, secret)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    shot(page, "keys")


def test_find_a_request_by_id_in_the_logs(page: Any, plat: Platform) -> None:
    rid = "req-find-me-" + os.urandom(4).hex()
    assert predict(plat, plat.key, **{"x-request-id": rid}).status_code == 200
    page.goto("/ui/deployments/work/logs")
    page.get_by_label("Request id").fill(rid)
    page.get_by_role("button", name="Search").click()
    log = page.get_by_label("Log lines")
    expect(log).to_contain_text(f"[{rid}] work: handled")
    assert all(rid in line for line in log.inner_text().strip().splitlines())
    page.get_by_label("Request id").fill("")
    page.get_by_role("button", name="Search").click()
    page.get_by_label("Live tail").check()
    rid2 = "req-live-" + os.urandom(4).hex()
    assert predict(plat, plat.key, **{"x-request-id": rid2}).status_code == 200
    expect(log).to_contain_text(rid2, timeout=10_000)  # arrived by the live tail, no reload


def test_events_usage_and_filter(page: Any, plat: Platform) -> None:
    page.goto("/ui/events")
    page.get_by_label("Kind contains").fill("promote")
    page.get_by_role("button", name="Filter").click()
    rows = page.get_by_role("table", name="Events").get_by_role("row")
    expect(rows.nth(1)).to_contain_text("promote")
    assert all("promote" in t for t in rows.all_inner_texts()[1:])
    page.goto("/ui/usage")
    table = page.get_by_role("table", name="Usage by day, key and deployment")
    expect(table.get_by_role("row").filter(has_text="work").first).to_be_visible()
    shot(page, "usage")


def test_read_only_key_and_csrf(browser: Any, plat: Platform, page: Any) -> None:
    ro = plat.api("POST", "/keys", expect=201, json={"name": "viewer", "scopes": ["inference"]})["key"]
    ctx = browser.new_context(base_url=plat.url)
    try:
        pg = ctx.new_page()
        pg.goto("/")
        pg.get_by_label("API key").fill(ro)
        pg.get_by_role("button", name="Sign in").click()
        expect(pg.get_by_text("read-only")).to_be_visible()
        pg.goto("/ui/deployments/work")
        expect(pg.get_by_role("heading", name="work")).to_be_visible()
        assert pg.get_by_role("button", name=re.compile("Promote|Roll back|Scale")).count() == 0
        csrf = pg.locator("input[name=csrf]").first.get_attribute("value")
        r = pg.request.post("/ui/deployments/work/rollback", form={"csrf": csrf, "env": "production"})
        assert r.status == 403 and "read-only" in r.text()
        pg.goto("/ui/keys")
        assert pg.get_by_role("table", name="Keys").get_by_role("row").count() == 2  # its own key only
    finally:
        ctx.close()
    # An admin's action without its token, or from another origin, is refused and changes nothing.
    r = page.request.post("/ui/deployments/work/rollback", form={"csrf": "forged", "env": "production"})
    assert r.status == 403
    page.goto("/ui/deployments/work")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    r = page.request.post("/ui/deployments/work/rollback", form={"csrf": csrf, "env": "production"},
                          headers={"origin": "http://attacker.test"})
    assert r.status == 403
    assert plat.show("work")["environments"][0]["version"] == 2


def test_accessibility(browser: Any, plat: Platform, page: Any) -> None:
    cookies = page.context.cookies()
    found = {path: axe_violations(browser, plat, cookies, path)
             for path in ("/", "/ui/deployments/work", "/ui/events", "/ui/keys", "/ui/usage",
                          "/ui/deployments/work/logs")}
    assert found == {path: [] for path in found}
    assert axe_violations(browser, plat, [], "/") == []  # the sign-in page
