"""Credentials in a source URL: found before any stage logs its params to MLflow or DVC locks
them."""

from __future__ import annotations

import re

# The environment variable that holds a source URL kept out of params (`env:CHESTCT_SOURCE_URL`).
URL_ENV = "CHESTCT_SOURCE_URL"
# Keys that carry credentials in signed or token URLs (matched as substrings), in a query, a
# fragment, a path segment's `;key=value` parameters or a `key=value` path segment.
_SECRET_KEYS = ("token", "sig", "secret", "key", "password", "passwd", "auth", "credential",
                "x-amz-", "x-goog-", "session", "jwt", "bearer")  # fmt: skip
# Values that are credentials by their form wherever they sit: GitHub, GitLab, Slack, AWS,
# OpenAI-style keys and JWTs.
_SECRET_VALUE = re.compile(
    r"(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|glpat-[\w-]{20,}|xox[abprs]-[\w-]{10,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]*)"
)
# A long run of mixed-case letters and digits (base64url) with the entropy of a random token:
# hex digests and UUIDs (one case) and words are not taken for one.
_RANDOM_RUN = re.compile(r"[A-Za-z0-9_-]{32,}")


def _random_token(text: str) -> bool:
    import math
    from collections import Counter

    for run in _RANDOM_RUN.findall(text):
        classes = (any(c.islower() for c in run), any(c.isupper() for c in run))
        digits = sum(c.isdigit() for c in run)
        if not (all(classes) and digits >= 3):
            continue
        counts = Counter(run)
        entropy = -sum(n / len(run) * math.log2(n / len(run)) for n in counts.values())
        if entropy >= 4.0:
            return True
    return False


def secret_in_url(url: str) -> str | None:
    """What in `url` looks like a credential, or None: user info; a query, fragment or path
    parameter whose key names one (token, sig, key, X-Amz-Signature, ...); a `key=value` path
    segment of that kind; a value shaped like a known token (ghp_, AKIA, JWT, ...); or a long
    random-looking run of letters and digits anywhere after the host."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        return "user name or password"
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    pairs += urllib.parse.parse_qsl(parts.fragment, keep_blank_values=True)
    path = urllib.parse.unquote(parts.path)
    for segment in path.split("/"):
        for piece in [*segment.split(";")[1:], segment]:
            if "=" in piece:
                key, _, value = piece.partition("=")
                pairs.append((key, value))
    for key, _ in pairs:
        if any(word in key.lower() for word in _SECRET_KEYS):
            return f"parameter {key!r}"
    rest = " ".join([path, *(v for _, v in pairs), urllib.parse.unquote(parts.fragment)])
    if _SECRET_VALUE.search(rest):
        return "a value shaped like an access token or key"
    if _random_token(rest):
        return "a long random-looking value (a signature or token?)"
    return None
