"""How every CLI command finds Ballast and the key to send it: one order, in one place.

URL: `--url`, `BALLAST_URL`, the saved platform's, then http://127.0.0.1:8000.
Key: `--api-key`, `BALLAST_API_KEY`, then the saved key, but only when the URL is the platform that
key was saved for, so the admin key never travels to another host (a replica, a remote platform).

Saved credentials are a *profile*: `default` is the one `ballast up` writes to `$BALLAST_HOME/credentials.json`;
named profiles (`ballast profiles add`, chosen by `--profile NAME`, `BALLAST_PROFILE` or `ballast profiles use`)
live in `$BALLAST_HOME/profiles.json` and only change which record `load_profile` returns.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ballast.home import home_path

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PROFILE = "default"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class Profile:
    """Saved credentials: the platform URL and the key `ballast up` saved for it."""

    name: str
    url: str | None = None
    api_key: str | None = None
    ca_cert: str | None = None  # a PEM bundle to verify the platform's TLS certificate (a private CA)


def profiles_path() -> Path:
    return home_path() / "profiles.json"


def check_profile_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
        raise ValueError(f"profile name {name!r}: use lowercase letters, digits, dashes and underscores")
    return name


def read_profiles() -> dict[str, Any]:
    """`{"current": NAME | None, "profiles": {NAME: {"url", "api_key"}}}` from profiles.json (empty if none)."""
    try:
        data = json.loads(profiles_path().read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        return {"current": None, "profiles": {}}
    return {"current": data.get("current"), "profiles": data["profiles"]}


def load_profile(name: str | None = None) -> Profile:
    """The profile `name`, else BALLAST_PROFILE, else the current one (`ballast profiles use`), else the
    default one `ballast up` saved; a named profile that does not exist is an error."""
    profiles = read_profiles()
    name = name or os.environ.get("BALLAST_PROFILE") or profiles["current"] or DEFAULT_PROFILE
    record = profiles["profiles"].get(name)
    if isinstance(record, dict):
        url, key, ca = record.get("url"), record.get("api_key"), record.get("ca_cert")
        return Profile(name, str(url) if url else None, str(key) if key else None, str(ca) if ca else None)
    if name != DEFAULT_PROFILE:
        raise ValueError(f"unknown profile {name!r} (see `ballast profiles list`)")
    try:
        data = json.loads((home_path() / "credentials.json").read_text())
    except (OSError, ValueError):
        return Profile(name)
    if not isinstance(data, dict):
        return Profile(name)
    url, key = data.get("url"), data.get("api_key")
    return Profile(name, str(url) if url else None, str(key) if key else None)


def _origin(url: str) -> tuple[str, str, int | None]:
    u = httpx.URL(url if "://" in url else "http://" + url)
    host = "loopback" if u.host in LOOPBACK else u.host
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return u.scheme, host, port


def same_platform(url: str, platform_url: str) -> bool:
    """True when `url` (any route) is served by the platform at `platform_url` (loopback names are one host)."""
    try:
        return _origin(url) == _origin(platform_url)
    except (httpx.InvalidURL, ValueError):
        return False


@dataclass(frozen=True)
class Credentials:
    """Where to send requests and with which key; `key_source` says where the key came from (for errors)."""

    url: str
    api_key: str | None
    key_source: str | None
    verify: str | bool = True  # httpx's `verify`: the profile's CA bundle for its own platform

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _key_for(url: str, api_key: str | None, saved: Profile) -> tuple[str | None, str | None]:
    if api_key:
        return api_key, "--api-key"
    if env := os.environ.get("BALLAST_API_KEY"):
        return env, "BALLAST_API_KEY"
    if saved.api_key and saved.url and same_platform(url, saved.url):
        where = home_path() / "credentials.json" if saved.name == DEFAULT_PROFILE else f"profile {saved.name}"
        return saved.api_key, f"the saved credentials ({where})"
    return None, None


def platform_credentials(url: str | None = None, api_key: str | None = None,
                         profile: str | None = None) -> Credentials:
    """For the REST API: the platform's base URL (without /api/v1) and its key."""
    saved = load_profile(profile)
    base = (url or os.environ.get("BALLAST_URL") or saved.url or DEFAULT_URL).rstrip("/")
    base = base.removesuffix("/api/v1")
    verify: str | bool = saved.ca_cert if saved.ca_cert and saved.url and same_platform(base, saved.url) else True
    return Credentials(base, *_key_for(base, api_key, saved), verify)


def endpoint_credentials(url: str, api_key: str | None = None, profile: str | None = None) -> Credentials:
    """For a URL given on the command line (a replica, or a gateway route of the platform)."""
    return Credentials(url, *_key_for(url, api_key, load_profile(profile)))


def auth_hint(status: int, creds: Credentials) -> str:
    """What to try after a 401/403, given where the key came from."""
    if status == 401 and creds.api_key is None:
        return " (no API key sent: pass --api-key or set BALLAST_API_KEY)"
    if status in (401, 403) and creds.key_source:
        return f" (the key came from {creds.key_source})"
    return ""
