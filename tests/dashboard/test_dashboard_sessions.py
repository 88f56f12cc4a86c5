"""Dashboard sessions and tenancy over plain HTTP against a real `ballast up`: the signing secret's mode, forged,
tampered and expired cookies, a revoked key's session, a key limited to some deployments, and security headers."""

from __future__ import annotations

import hashlib
import hmac
import re
import stat
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

MODEL = "class Model:\n    def predict(self, x):\n        return {'ok': True}\n"


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("dash-sessions")
    p = Platform(root / "home").start()
    try:
        for name in ("alpha", "beta"):
            p.api("POST", "/deployments", expect=201, json={"path": str(write_package(root / name, f"name: {name}\n",
                                                                                       MODEL))})
        for name in ("alpha", "beta"):  # production is set once the first version serves
            p.wait_serving(name, 1, timeout=180)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


def sign_in(p: Platform, key: str) -> httpx.Client:
    c = httpx.Client(base_url=p.url, timeout=30)
    r = c.post("/ui/login", data={"api_key": key})
    assert r.status_code == 303 and "ballast_session" in c.cookies, r.text
    return c


def signed_in(c: httpx.Client) -> bool:
    r = c.get("/")
    return r.status_code == 200 and "Sign out" in r.text


def test_secret_is_private_and_cookies_cannot_be_forged(plat: Platform) -> None:
    secret_file = plat.home / "dashboard.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    c = sign_in(plat, plat.key)
    assert signed_in(c)
    cookie = c.cookies["ballast_session"]
    key_id, issued, sig = cookie.split(".")
    for forged in (f"{key_id}.{issued}.{'0' * 64}", f"{key_id}.{int(issued) + 1}.{sig}", "garbage", ""):
        assert not signed_in(httpx.Client(base_url=plat.url, cookies={"ballast_session": forged}))
    secret = bytes.fromhex(secret_file.read_text().strip())
    old = f"{key_id}.{int(time.time()) - 13 * 3600}"
    expired = f"{old}.{hmac.new(secret, old.encode(), hashlib.sha256).hexdigest()}"
    assert not signed_in(httpx.Client(base_url=plat.url, cookies={"ballast_session": expired}))
    r = c.get("/ui/deployments/alpha")
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert r.headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in r.headers[
        "content-security-policy"]


def test_revoking_the_signed_in_key_ends_its_session(plat: Platform) -> None:
    made = plat.api("POST", "/keys", expect=201, json={"name": "second-admin", "scopes": ["admin"]})
    c = sign_in(plat, made["key"])
    assert signed_in(c)
    plat.api("DELETE", f"/keys/{made['id']}")
    assert not signed_in(c)
    r = c.get("/ui/keys", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_a_key_limited_to_one_deployment_sees_only_it(plat: Platform) -> None:
    made = plat.api("POST", "/keys", expect=201, json={"name": "alpha-only", "scopes": ["inference"],
                                                       "deployments": ["alpha"]})
    c = sign_in(plat, made["key"])
    home = c.get("/").text
    assert "/ui/deployments/alpha" in home and "/ui/deployments/beta" not in home and "read-only" in home
    assert c.get("/ui/deployments/alpha").status_code == 200
    assert c.get("/ui/deployments/beta").status_code == 404
    assert c.get("/ui/deployments/beta/metrics").status_code == 404
    assert c.get("/ui/deployments/beta/logs/lines").status_code == 404
    assert c.get("/ui/deployments/alpha/metrics", params={"range": "15m"}).json()["deployment"] == "alpha"
    events = c.get("/ui/events").text
    assert "alpha" in events and not re.search(r"<td>beta</td>", events)
    keys = c.get("/ui/keys").text
    assert "alpha-only" in keys and "second-admin" not in keys and "Create key" not in keys


def test_bad_input_is_a_page_not_a_stack_trace(plat: Platform) -> None:
    c = sign_in(plat, plat.key)
    assert c.get("/ui/deployments/Not_A_Name").status_code == 404
    r = c.get("/ui/deployments/alpha/metrics", params={"range": "2y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "range" and r.headers["x-request-id"]
    assert c.get("/ui/static/..%2f..%2fstate.db").status_code == 404
    assert c.get("/ui/usage", params={"days": "-1"}).status_code == 200
    page = c.get("/ui/deployments/alpha").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    r = c.post("/ui/deployments/alpha/promote", data={"csrf": csrf, "version": "x"}, follow_redirects=True)
    assert r.status_code == 200 and "version must be a whole number" in r.text
    r = c.post("/ui/deployments/alpha/promote", data={"csrf": csrf, "version": "9"}, follow_redirects=True)
    assert r.status_code == 200 and 'role="alert"' in r.text and "Traceback" not in r.text
    assert plat.show("alpha")["environments"][0]["version"] == 1


def test_the_sampler_reports_its_cost(plat: Platform) -> None:
    text = plat.wait("a sample", lambda: (lambda t: t if re.search(r"^ballast_metrics_history_samples_total [1-9]",
                                                                    t, re.M) else None)(
        httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {plat.key}"}).text), timeout=40)
    assert re.search(r"^ballast_metrics_history_cpu_seconds_total [0-9.e-]+$", text, re.M)

