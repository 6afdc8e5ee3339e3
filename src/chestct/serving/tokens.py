"""Bearer tokens of the protected routes and the per-token rate limit of POST /feedback.

GET /history (read) and POST /feedback (write the labels behind live-performance monitoring)
have a token each, so that whoever may read the history cannot rewrite the labels. Both are
compared the same way: as bytes, the configured token encoded as UTF-8 against the header as
the client sent it (WSGI hands headers over as latin-1 text, which encodes back to those
bytes), with hmac.compare_digest.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

from flask import Response, request

from chestct.serving.problems import problem_response

HISTORY_TOKEN_ENV = "CHESTCT_HISTORY_TOKEN"
FEEDBACK_TOKEN_ENV = "CHESTCT_FEEDBACK_TOKEN"


def bearer_matches(header: str, token: str) -> bool:
    """Whether an Authorization header carries `token` as a bearer token, compared as bytes."""
    given = header.encode("latin-1", "replace")
    return hmac.compare_digest(given, b"Bearer " + token.encode("utf-8"))


def token_refusal(token: str, setting: str, env: str, what: str) -> Response | None:
    """None when the request carries `token`, else the problem answer: 403 when no token is
    configured (`setting` / `env` name where to set one), 401 when it does not match."""
    if not token:
        return problem_response(
            403, f"{what} disabled", f"no token is configured; set {setting} or {env}"
        )
    if bearer_matches(request.headers.get("Authorization", ""), token):
        return None
    resp = problem_response(
        401, "Unauthorized", "send the configured token as 'Authorization: Bearer <token>'"
    )
    resp.headers["WWW-Authenticate"] = 'Bearer realm="chestct"'
    return resp


class RateLimiter:
    """A token bucket per key: `per_minute` answers a minute, in bursts of up to as many.

    Kept in the worker's memory, so with N gunicorn workers a key gets up to N x `per_minute`;
    keys are sha256 digests, never the secrets themselves.
    """

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[bytes, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """0 when `key` may go ahead now (and is charged), else the seconds until it may."""
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        now = time.monotonic()
        with self._lock:
            level, then = self._buckets.get(digest, (self.capacity, now))
            level = min(self.capacity, level + (now - then) * self.rate)
            if level >= 1.0:
                self._buckets[digest] = (level - 1.0, now)
                return 0.0
            self._buckets[digest] = (level, now)
            return (1.0 - level) / self.rate
