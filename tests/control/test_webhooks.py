"""Webhook signatures (checked with the `standardwebhooks` package, as a receiver would) and target checks."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks import Webhook

from ballast.control.errors import ControlError
from ballast.control.webhooks import check_target, new_secret, parse_allow, sign


def test_signature_verifies_with_standardwebhooks() -> None:
    secret = new_secret()
    body = json.dumps({"request_id": "req-1", "data": {"x": 1}}).encode()
    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts),
               "webhook-signature": sign(secret, "msg_1", ts, body)}
    assert Webhook(secret).verify(body, headers)["data"] == {"x": 1}
    with pytest.raises(Exception):  # noqa: B017 (the package's own verification error)
        Webhook(new_secret()).verify(body, headers)


@pytest.mark.parametrize(("url", "reason"), [
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://169.254.10.1/", "link-local"),
    ("http://127.0.0.1:9/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://10.0.0.5/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
])
def test_blocked_targets_name_the_reason(url: str, reason: str) -> None:
    with pytest.raises(ControlError) as e:
        check_target(url, [])
    assert e.value.status == 400 and reason in e.value.message and e.value.code == "webhook_target_blocked"


def test_allow_list_and_bad_urls() -> None:
    check_target("http://127.0.0.1:9/hook", parse_allow(["127.0.0.1/32"]))
    check_target("http://10.0.0.5/hook", parse_allow(["10.0.0.0/8,192.168.0.0/16"]))
    check_target("http://93.184.215.14/hook", [])  # a public address needs no allow-list
    for bad in ("ftp://example.com/x", "not a url", "http:///path"):
        with pytest.raises(ControlError) as e:
            check_target(bad, [])
        assert e.value.status == 400
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_allow(["127.0.0.1/99"])
