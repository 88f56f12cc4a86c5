"""TLS for a platform that listens beyond loopback: API keys and prompts must not cross a network in clear."""

from __future__ import annotations

from pathlib import Path

from ballast.observe import is_loopback as observe_is_loopback

PLAINTEXT_WARNING = (
    "WARNING: listening on {host} WITHOUT TLS: API keys, prompts and packages cross the network in clear text. "
    "Pass --tls-cert and --tls-key (or put a TLS proxy in front and listen on 127.0.0.1)."
)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; 0.0.0.0, :: and every other address reach beyond this machine."""
    host = host.strip("[]")
    return host.lower() == "localhost" or observe_is_loopback(host)  # a host name: it may resolve to anything


def tls_settings(cert: str | None, key: str | None) -> dict[str, str]:
    """uvicorn's ssl settings, or {} without TLS; both files or neither, and they must be readable."""
    if not cert and not key:
        return {}
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    for what, path in (("certificate", cert), ("key", key)):
        if not Path(path).is_file():
            raise ValueError(f"TLS {what} {path}: no such file")
    return {"ssl_certfile": cert, "ssl_keyfile": key}
