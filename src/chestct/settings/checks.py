"""Checks across params keys: what a type, a choice or a range of one key cannot refuse.

Ranges of single keys are declared on the fields (`schema.key`) and checked while the file is
read; what is left here relates two keys, checks a string's form, or keeps a credential out of
the params.
"""

from __future__ import annotations

import re

from chestct.settings.model_params import BaseModelParams, PromoteParams
from chestct.settings.params import Params
from chestct.settings.schema import SettingsError
from chestct.settings.secrets import URL_ENV, secret_in_url

# A redirect_hosts entry: a host name or [IPv6] address, with an optional port.
_HOST_PORT = r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"


def check_params(params: Params) -> None:
    """Every cross-key check of a params tree; raises SettingsError naming the keys."""
    fractions = params.split.valid_fraction + params.split.test_fraction
    if not 0 < fractions < 1 or min(params.split.valid_fraction, params.split.test_fraction) <= 0:
        raise SettingsError(
            "split.valid_fraction and split.test_fraction: each must be > 0 and together < 1"
        )
    bad = set(params.ingest.synthetic_per_class) - {"train", "valid", "test"}
    if bad:
        raise SettingsError(
            f"ingest.synthetic_per_class: unknown split {sorted(bad)[0]!r}; use train, valid, test"
        )
    if not params.base_model.filters:
        raise SettingsError("base_model.filters: must be a non-empty list of positive integers")
    validate = params.validate
    if validate.min_side > validate.max_side:
        raise SettingsError("validate.min_side, validate.max_side: need 1 <= min_side <= max_side")
    check_model(params.base_model)
    _check_source(params)
    check_promote(params.promote)


def _check_source(params: Params) -> None:
    """ingest's digest, URL and redirect hosts."""
    ingest = params.ingest
    digest = ingest.sha256.strip().lower()
    if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        raise SettingsError(
            f"ingest.sha256: {ingest.sha256!r} is not a sha256 (64 hex digits); "
            "compute it with `sha256sum <archive>`"
        )
    if ingest.source.lower().startswith(("http://", "https://")):
        secret = secret_in_url(ingest.source)
        if secret:
            # Refused here, before any stage logs its params to MLflow or DVC locks them.
            raise SettingsError(
                f"ingest.source: the URL carries a credential ({secret}); params are written "
                "to dvc.lock, pointer.json and MLflow. Export the URL as "
                f"{URL_ENV}=... and set ingest.source: env:{URL_ENV} (or send a bearer token "
                "in CHESTCT_SOURCE_TOKEN)"
            )
    if ingest.source.lower().startswith(("http://", "https://", "env:")) and not digest:
        raise SettingsError(
            "ingest.sha256: required when ingest.source is a URL; set it to the archive's "
            "sha256 (`sha256sum <archive>`) so that a changed or corrupted download is refused"
        )
    for host in ingest.redirect_hosts:
        if not re.fullmatch(_HOST_PORT, host):
            raise SettingsError(
                f"ingest.redirect_hosts: {host!r} is not a host name or host:port (no scheme, "
                "path or user); e.g. downloads.example.org or mirror.example.org:8443"
            )


def check_model(model: BaseModelParams) -> None:
    """base_model values that no stage can build a model from."""
    weights = model.weights
    if weights not in ("none", "imagenet") and not weights.endswith((".h5", ".keras")):
        raise SettingsError(
            f"base_model.weights: {weights!r} is not allowed; use none, imagenet or a path to "
            "a .h5/.weights.h5/.keras file"
        )
    if model.architecture == "small_cnn" and weights == "imagenet":
        raise SettingsError(
            "base_model.weights: small_cnn has no imagenet weights; use none, a path to a "
            ".weights.h5/.keras file, or a pretrained architecture"
        )
    if model.freeze == "backbone" and weights == "none":
        raise SettingsError(
            "base_model.freeze: backbone would keep randomly initialised weights fixed "
            "(base_model.weights is none); use auto or none, or give pretrained weights"
        )


def check_promote(promote: PromoteParams) -> None:
    """promote values that no run can use."""
    metric = promote.metric.strip()
    if not metric or metric.split(".")[0] == "external":
        raise SettingsError(
            f"promote.metric {promote.metric!r}: "
            + (
                "the external test set is reported apart and never used for selection; "
                if metric
                else "must name a metric; "
            )
            + "choose a key of reports/evaluate/metrics.json such as robust_macro_f1"
        )
    if not promote.registered_model.strip():
        raise SettingsError("promote.registered_model: must be a non-empty name")
