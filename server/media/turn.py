"""TURN REST API credentials (the scheme coturn's --use-auth-secret checks).

The server and coturn share a secret. For each client the server issues a
username `expiry:name` and a password `base64(HMAC-SHA1(secret, username))`;
coturn recomputes the password and refuses it after `expiry` (Unix seconds).
So no long-lived TURN password ever reaches a browser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

TURN_SECRET_ENV = "MOSHI_WEBRTC_TURN_SECRET"


def turn_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def turn_rest_credentials(secret: str, name: str, ttl_s: int, now: float | None = None) -> tuple[str, str]:
    """(username, password) valid for `ttl_s` seconds from `now`."""
    if ":" in name:
        raise ValueError("a TURN REST name cannot contain ':'")
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{name}"
    return username, turn_password(secret, username)
