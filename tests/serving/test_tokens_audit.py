"""Issue 21 items 2 (JSON nesting) and 5: /feedback's own token, compared as /history's is,
its rate limit, deep JSON on every JSON endpoint, and the audit log's retention."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chestct.monitoring.audit import AuditLog
from chestct.serving import create_app
from model_folder import multipart, slice_png

HISTORY = "history-sécret"
FEEDBACK = "feedback-sécret"


def as_sent(token: str) -> dict[str, str]:
    """The header a client sends with a UTF-8 token, as WSGI hands it over (latin-1 text)."""
    return {"Authorization": "Bearer " + token.encode().decode("latin-1")}


def app_with(tmp_path: Path, model_dir: Path, **extra):
    config = {
        "MODEL_DIR": str(model_dir),
        "AUDIT_LOG": True,
        "AUDIT_DB": str(tmp_path / "audit.sqlite"),
        "HISTORY_TOKEN": HISTORY,
        "FEEDBACK_TOKEN": FEEDBACK,
        "MC_DROPOUT_SAMPLES": 0,
    }
    return create_app(config | extra).test_client()


def test_history_and_feedback_tokens_are_separate_and_compared_alike(
    tmp_path: Path, model_dir: Path
) -> None:
    client = app_with(tmp_path, model_dir)
    answer = client.post("/predict", **multipart(slice_png(1))).get_json()
    good = {"id": answer["id"], "label": "normal"}
    # The read token cannot write labels, nor the write token read the history.
    assert client.post("/feedback", json=good, headers=as_sent(HISTORY)).status_code == 401
    assert client.get("/history", headers=as_sent(FEEDBACK)).status_code == 401
    # A non-ASCII token works on both, sent as its UTF-8 bytes.
    assert client.get("/history", headers=as_sent(HISTORY)).status_code == 200
    resp = client.post("/feedback", json=good, headers=as_sent(FEEDBACK))
    assert resp.status_code == 200 and resp.get_json()["recorded"] is True
    for header in ("Bearer \xe9\xff", "Bearer " + FEEDBACK, "Bearer ☃", ""):
        resp = client.post("/feedback", json=good, headers={"Authorization": header})
        assert resp.status_code == 401 and resp.mimetype == "application/problem+json"
    no_token = app_with(tmp_path, model_dir, FEEDBACK_TOKEN="")
    resp = no_token.post("/feedback", json=good, headers=as_sent(HISTORY))
    assert resp.status_code == 403 and "feedback_token" in resp.get_json()["detail"]


def test_feedback_token_from_the_environment(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHESTCT_FEEDBACK_TOKEN", "from-env")
    client = app_with(tmp_path, model_dir, FEEDBACK_TOKEN="from-config")
    # A test config is applied on top of the environment (as for the history token).
    answer = client.post("/predict", **multipart(slice_png(2))).get_json()
    good = {"id": answer["id"], "label": "normal"}
    assert client.post("/feedback", json=good, headers=as_sent("from-config")).status_code == 200
    from chestct.serving.service import service_settings

    settings = service_settings({"MODEL_DIR": str(model_dir)})
    assert settings.serving.feedback_token == "from-env"


def test_feedback_is_rate_limited_per_token(tmp_path: Path, model_dir: Path) -> None:
    client = app_with(tmp_path, model_dir, FEEDBACK_PER_MINUTE=3)
    answer = client.post("/predict", **multipart(slice_png(3))).get_json()
    good = {"id": answer["id"], "label": "normal"}
    statuses = [
        client.post("/feedback", json=good, headers=as_sent(FEEDBACK)).status_code
        for _ in range(5)
    ]
    assert statuses == [200, 200, 200, 429, 429]
    resp = client.post("/feedback", json=good, headers=as_sent(FEEDBACK))
    assert resp.mimetype == "application/problem+json"
    assert int(resp.headers["Retry-After"]) >= 1
    assert "feedback_per_minute" in resp.get_json()["detail"]
    # A wrong token is refused as unauthorised, not counted against the real one.
    assert client.post("/feedback", json=good, headers=as_sent("x")).status_code == 401


@pytest.mark.parametrize("path", ["/feedback", "/predict", "/explain"])
def test_deep_json_is_a_quick_400_with_one_log_line(
    tmp_path: Path, model_dir: Path, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = app_with(tmp_path, model_dir)
    headers = as_sent(FEEDBACK) | {"Content-Type": "application/json"}
    for depth in (100_000, 33):
        body = "[" * depth + "]" * depth
        with caplog.at_level(logging.WARNING, logger="chestct"):
            caplog.clear()
            resp = client.post(path, data=body, headers=headers)
        assert resp.status_code == 400, (path, depth, resp.get_data(as_text=True)[:200])
        assert resp.mimetype == "application/problem+json"
        assert resp.get_json()["title"] == "JSON too deeply nested"
        lines = [r for r in caplog.records if "nested" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None
    # A flat body still goes through.
    resp = client.post(path, json={"id": "0" * 32, "label": "normal"}, headers=as_sent(FEEDBACK))
    assert resp.status_code in (400, 404) and resp.get_json()["title"] != "JSON too deeply nested"


def _row(i: int) -> dict:
    return {
        "id": f"{i:032x}",
        "input": {"sha256": "0" * 64},
        "label": "normal",
        "probabilities": {"normal": 1.0},
        "uncertainty": {"abstain": False},
        "ood": {"out_of_distribution": False},
        "model": {"name": "m", "version": "1"},
    }


def test_audit_log_keeps_at_most_max_rows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("chestct.monitoring.audit.PRUNE_EVERY", 10)
    audit = AuditLog(tmp_path / "a.sqlite", max_rows=25)
    audit.open()
    for i in range(100):
        audit.record("/predict", _row(i))
    assert audit.record_feedback(f"{99:032x}", "normal")
    kept = audit.latest(1000)
    assert 25 <= len(kept) <= 25 + 10  # pruned every 10 records
    assert kept[0]["prediction_id"] == f"{99:032x}"  # the newest stay
    assert audit.prune() >= 0 and len(audit.latest(1000)) == 25
    assert audit.window(last=1)[0]["true_label"] == "normal"


def test_audit_log_drops_rows_past_the_retention(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "a.sqlite"
    audit = AuditLog(path, retention_days=30)
    audit.open()
    for i in range(4):
        audit.record("/predict", _row(i))
    old = (datetime.now(UTC) - timedelta(days=31)).isoformat(timespec="milliseconds")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE predictions SET time = ? WHERE id <= 2", (old,))
    assert audit.record_feedback(f"{0:032x}", "normal")
    assert audit.prune() == 2
    assert [e["prediction_id"] for e in audit.latest(10)] == [f"{3:032x}", f"{2:032x}"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0
    # Opening an existing log applies the retention too.
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE predictions SET time = ?", (old,))
    AuditLog(path, retention_days=30).open()
    assert audit.latest(10) == []


def test_refused_slices_age_out_by_the_same_retention(tmp_path: Path) -> None:
    """Refused slices are audit rows too: the row limit and the retention apply to them."""
    import sqlite3

    path = tmp_path / "a.sqlite"
    audit = AuditLog(path, max_rows=3, retention_days=30)
    audit.open()
    for i in range(6):
        audit.record_refusal("/predict", f"{i:064x}", "flat_graphic", ("chestct", "1"))
    audit.prune()
    assert [r["sha256"] for r in audit.refusals()] == [f"{i:064x}" for i in (3, 4, 5)]
    old = (datetime.now(UTC) - timedelta(days=31)).isoformat(timespec="milliseconds")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE refusals SET time = ? WHERE sha256 = ?", (old, f"{3:064x}"))
    audit.prune()
    assert [r["sha256"] for r in audit.refusals()] == [f"{i:064x}" for i in (4, 5)]
    assert [r["sha256"] for r in audit.refusals(last=1)] == [f"{5:064x}"]
