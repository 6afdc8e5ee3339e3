"""Monitoring after promotion: signals, the reference profile, drift, feedback and alerting.

Slices go through the real app (Flask test client, audit log on) into the real audit log and
/metrics; `python -m chestct.monitoring.monitor` then judges the window, and the alert rules in
config/monitoring/alerts.yml are evaluated by promtool on series built from what /metrics
exported. Needs Debian's `prometheus` package for promtool (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from chestct.imaging.perturb import gamma, zoom_out
from chestct.labels import CLASSES
from chestct.monitoring.signals import (
    CLASS_SIGNAL,
    REFERENCE_FILE,
    SIGNALS,
    bin_counts,
    bin_index,
    fit_reference,
    psi,
)
from chestct.serving import create_app
from chestct.settings import MonitorConfig
from helpers import zoomed
from model_folder import ct_slice, encode
from shipped import config_text, shipped

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "config" / "monitoring"
PROMTOOL = shutil.which("promtool")
TOKEN = "s3cret-token"
FEEDBACK_TOKEN = "feedback-s3cret"
N_WINDOW = 80

if PROMTOOL is None and os.environ.get("CHESTCT_REQUIRE_PROMTOOL"):
    # CI sets CHESTCT_REQUIRE_PROMTOOL after installing prometheus: a silent skip would hide a
    # broken install.
    raise RuntimeError("CHESTCT_REQUIRE_PROMTOOL is set but promtool is not on PATH")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is absent: install Debian's prometheus package "
    "(`apt-get install prometheus`; .ci/run does)",
)


# --------------------------------------------------------------------------- model folders


def brighter(img: np.ndarray, offset: int = 40) -> np.ndarray:
    """Another scanner's grey level: everything `offset` grey levels brighter."""
    return np.clip(img.astype(np.int16) + offset, 0, 255).astype(np.uint8)


def balanced(i: int) -> str:
    return CLASSES[i % len(CLASSES)]


SCENARIOS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[int], str], str]] = {
    "zoom": (zoomed, balanced, "foreground"),
    "grey": (brighter, balanced, "mean_grey"),
    "class_mix": (lambda img: img, lambda i: "normal", CLASS_SIGNAL),
}


def serve(folder: Path, tmp_path: Path):
    app = create_app(
        {
            "MODEL_DIR": str(folder),
            "AUDIT_LOG": True,
            "AUDIT_DB": str(tmp_path / "audit.sqlite"),
            "HISTORY_TOKEN": TOKEN,
            "FEEDBACK_TOKEN": FEEDBACK_TOKEN,
            "MC_DROPOUT_SAMPLES": 0,
        }
    )
    return app.test_client()


def send(client, n: int, transform, label_of, seed0: int = 90_000) -> list[dict[str, Any]]:
    answers = []
    for i in range(n):
        img = transform(ct_slice(seed0 + i, label_of(i)))
        resp = client.post("/predict", data=encode(img), content_type="image/png")
        assert resp.status_code == 200, resp.get_json()
        answers.append(resp.get_json())
    return answers


def run_monitor_cli(tmp_path: Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CHESTCT_ROOT": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "chestct.monitoring.monitor",
        "--db",
        str(tmp_path / "audit.sqlite"),
        "--model-dir",
        str(folder),
        "--out",
        str(tmp_path / "report"),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def scraped(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric in Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), float(sample.value)))
    return out


# --------------------------------------------------------------------------- statistics


def test_psi_is_zero_for_the_same_mix_and_large_for_a_shift() -> None:
    assert psi([0.25] * 4, [25, 25, 25, 25]) == pytest.approx(0.0, abs=1e-12)
    assert psi([0.25] * 4, [97, 1, 1, 1]) > 1.0
    # Empty bins are floored, never infinite.
    assert np.isfinite(psi([0.5, 0.5, 0.0], [0, 10, 10]))


def test_bins_follow_prometheus_le_semantics() -> None:
    edges = (0.1, 0.5, 1.0)
    assert [bin_index(edges, v) for v in (0.0, 0.1, 0.10001, 1.0, 7.0)] == [0, 0, 1, 2, 3]
    assert bin_counts(edges, np.array([0.1, 0.2, 2.0, np.nan])).tolist() == [1, 1, 0, 1]


def test_fit_reference_records_every_signal_and_the_rates() -> None:
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(4), size=50)
    images = rng.integers(0, 255, size=(50, 16, 16), dtype=np.uint8)
    profile = fit_reference(
        classes=CLASSES,
        probabilities=proba,
        ood_distance=rng.uniform(0, 2, 50),
        ood_threshold=1.0,
        abstain_threshold=0.9,
        greys=list(images),
        labels=[CLASSES[i % 4] for i in range(50)],
    )
    assert set(profile["signals"]) == {s.name for s in SIGNALS} | {CLASS_SIGNAL}
    for sig in SIGNALS:
        entry = profile["signals"][sig.name]
        assert sum(entry["counts"]) == 50 and len(entry["fractions"]) == sig.bins()
        assert entry["values"] == sorted(entry["values"])
    assert 0 < profile["rates"]["ood"] < 1
    assert profile["true_class_mix"] == {c: 0.26 if i < 2 else 0.24 for i, c in enumerate(CLASSES)}
    json.dumps(profile)  # JSON-ready


def test_reference_signals_come_from_the_originals_as_served(tmp_path: Path) -> None:
    """evaluate reads the ingested originals (not the resized, possibly normalised model
    inputs) so that the reference's acquisition signals match what serving measures."""
    from chestct.monitoring.signals import decoded_greys, image_signals

    original = ct_slice(3, size=256)
    (tmp_path / "a.png").write_bytes(encode(original))
    fallback = np.full((2, 32, 32, 1), 200, np.float32)
    greys = decoded_greys(["a.png", ""], tmp_path, fallback)
    np.testing.assert_array_equal(greys[0], original)
    assert greys[1].shape == (32, 32) and greys[1].max() == 200
    assert image_signals(original) == image_signals(greys[0])
    # A zoom raises the body share; a brighter scanner the mean grey level.
    base = image_signals(original)
    assert image_signals(zoomed(original))["foreground"] > base["foreground"] + 0.2
    assert image_signals(brighter(original))["mean_grey"] == pytest.approx(
        base["mean_grey"] + 40, abs=3
    )


# --------------------------------------------------------------------------- the service


def test_in_distribution_slices_show_no_drift(monitored_model: Path, tmp_path: Path) -> None:
    client = serve(monitored_model, tmp_path)
    answers = send(client, N_WINDOW, lambda img: img, balanced)
    assert all(re.fullmatch(r"[0-9a-f]{32}", a["id"]) for a in answers)
    text = client.get("/metrics").get_data(as_text=True)
    (window,) = scraped(text, "chestct_window_predictions")
    assert window[1] == N_WINDOW
    drift = {labels["signal"]: value for labels, value in scraped(text, "chestct_drift_psi")}
    assert set(drift) >= {"foreground", "mean_grey", CLASS_SIGNAL}
    assert all(value < 0.25 for value in drift.values()), drift

    done = run_monitor_cli(tmp_path, monitored_model, "--last", str(N_WINDOW))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NO DRIFT" in done.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["verdict"] == "no drift" and report["window"]["n"] == N_WINDOW
    assert report["drifted"] == []
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(SIGNALS) + 1
    # The audit log keeps the signals (numbers only, no pixels).
    history = client.get("/history?limit=1", headers={"Authorization": f"Bearer {TOKEN}"})
    entry = history.get_json()["entries"][0]
    assert set(entry["signals"]) == {s.name for s in SIGNALS}
    assert entry["prediction_id"] == answers[-1]["id"]


def promtool_inputs(
    rule: str, series: dict[str, list[tuple[dict[str, str], float]]]
) -> tuple[list[dict[str, str]], str]:
    """Evaluate alert `rule`'s expression with promtool on the given scraped samples (held
    constant for 20 minutes, as labelled by a Prometheus scrape of job chestct)."""
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == rule]
    inputs = []
    for name, samples in series.items():
        for labels, value in samples:
            labels = {**labels, "instance": "app:8000", "job": "chestct"}
            text = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            inputs.append({"series": f"{name}{{{text}}}", "values": f"{value!r}x20"})
    return inputs, expr


def run_promtool(tmp_path: Path, test: dict[str, Any]) -> subprocess.CompletedProcess:
    (tmp_path / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(test))
    return subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_promtool
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_shifted_slices_are_flagged_by_monitor_and_alert(
    monitored_model: Path,
    tmp_path: Path,
    scenario: str,
) -> None:
    transform, label_of, expected = SCENARIOS[scenario]
    client = serve(monitored_model, tmp_path)
    send(client, N_WINDOW, transform, label_of)

    done = run_monitor_cli(tmp_path, monitored_model)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DRIFT" in done.stdout and expected in done.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["verdict"] == "drift"
    assert expected in report["drifted"], report["drifted"]
    assert report["signals"][expected]["psi"] >= 0.25
    if scenario == "class_mix":
        # Only the class mix moved: the acquisition signals still look like the reference.
        assert "mean_grey" not in report["drifted"] and "foreground" not in report["drifted"]

    # The same shift on /metrics, and the alert rule's expression fires on those series.
    text = client.get("/metrics").get_data(as_text=True)
    psi_samples = scraped(text, "chestct_drift_psi")
    exported = {labels["signal"]: value for labels, value in psi_samples}
    assert exported[expected] >= 0.25, exported
    series = {"chestct_drift_psi": psi_samples}
    inputs, expr = promtool_inputs("ChestctInputDrift", series)
    firing = [
        {
            "labels": f'{{instance="app:8000", job="chestct", signal="{signal}"}}',
            "value": value,
        }
        for signal, value in sorted(exported.items())
        if value >= 0.25
    ]
    test = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "promql_expr_test": [{"expr": expr, "eval_time": "15m", "exp_samples": firing}],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",  # `for: 10m`: pending, not yet firing
                        "alertname": "ChestctInputDrift",
                        "exp_alerts": [],
                    }
                ],
            }
        ],
    }
    proc = run_promtool(tmp_path, test)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(f'signal="{expected}"' in f["labels"] for f in firing)


@needs_promtool
def test_ood_rate_alert_fires_on_exported_rates(monitored_model: Path, tmp_path: Path) -> None:
    client = serve(monitored_model, tmp_path)
    send(client, N_WINDOW, lambda img: zoomed(img, 0.45), balanced)
    text = client.get("/metrics").get_data(as_text=True)
    rates = {labels["flag"]: v for labels, v in scraped(text, "chestct_window_rate")}
    expected = {labels["flag"]: v for labels, v in scraped(text, "chestct_reference_rate")}
    assert rates["ood"] > expected["ood"] + 0.10, (rates, expected)
    series = {
        name: scraped(text, name)
        for name in ("chestct_window_rate", "chestct_reference_rate", "chestct_window_predictions")
    }
    inputs, expr = promtool_inputs("ChestctOutOfDistributionRateHigh", series)
    test = {
        "rule_files": ["alerts.yml"],
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "15m",
                        "exp_samples": [
                            {
                                "labels": '{flag="ood", instance="app:8000", job="chestct"}',
                                "value": rates["ood"],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    proc = run_promtool(tmp_path, test)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_feedback_gives_live_metrics(monitored_model: Path, tmp_path: Path) -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    client = serve(monitored_model, tmp_path)
    answers = send(client, 60, lambda img: img, balanced, seed0=70_000)
    auth = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
    truth = [balanced(i) for i in range(60)]
    labelled = 40  # the rest stay unlabelled
    for answer, label in zip(answers[:labelled], truth, strict=False):
        resp = client.post("/feedback", json={"id": answer["id"], "label": label}, headers=auth)
        assert resp.status_code == 200 and resp.get_json()["recorded"] is True
    # A corrected label replaces the first one.
    wrong = "normal" if truth[0] != "normal" else "adenocarcinoma"
    client.post("/feedback", json={"id": answers[0]["id"], "label": wrong}, headers=auth)
    client.post("/feedback", json={"id": answers[0]["id"], "label": truth[0]}, headers=auth)

    done = run_monitor_cli(tmp_path, monitored_model, "--last", "60")
    assert done.returncode in (0, 1), done.stderr
    perf = json.loads((tmp_path / "report" / "report.json").read_text())["performance"]
    y_true = truth[:labelled]
    y_pred = [a["label"] for a in answers[:labelled]]
    assert perf["labelled"] == labelled and perf["judged"] is True
    assert perf["live"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    assert perf["live"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y_true, y_pred), abs=1e-6
    )
    assert perf["live"]["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=list(CLASSES), average="macro", zero_division=0),
        abs=1e-6,
    )
    assert perf["test"]["macro_f1"] == 0.58  # the card's figure
    assert "live on 40 labelled" in done.stdout


def test_feedback_refuses_bad_requests(monitored_model: Path, tmp_path: Path) -> None:
    client = serve(monitored_model, tmp_path)
    (answer,) = send(client, 1, lambda img: img, balanced)
    auth = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
    good = {"id": answer["id"], "label": "normal"}
    assert client.post("/feedback", json=good).status_code == 401
    assert (
        client.post("/feedback", json=good, headers={"Authorization": "Bearer x"}).status_code
        == 401
    )
    resp = client.post("/feedback", json={**good, "label": "cat"}, headers=auth)
    assert resp.status_code == 400 and "normal" in resp.get_json()["detail"]
    resp = client.post("/feedback", json={**good, "id": "0" * 32}, headers=auth)
    assert resp.status_code == 404 and resp.get_json()["title"] == "Unknown prediction"
    resp = client.post("/feedback", json={**good, "id": "../../etc"}, headers=auth)
    assert resp.status_code == 400
    resp = client.post("/feedback", data="label=normal", headers=auth)
    assert resp.status_code == 400 and resp.mimetype == "application/problem+json"
    off = create_app({"MODEL_DIR": str(monitored_model)}).test_client()
    assert off.post("/feedback", json=good, headers=auth).status_code == 404


def test_monitor_errors_name_the_fix(
    monitored_model: Path,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    done = run_monitor_cli(tmp_path, monitored_model)
    assert done.returncode == 2 and "serving.audit_log: true" in done.stderr
    serve(monitored_model, tmp_path).get("/health")  # creates the audit log
    done = run_monitor_cli(tmp_path, model_dir)  # a model promoted without a reference
    assert done.returncode == 2 and "dvc repro evaluate promote" in done.stderr
    done = run_monitor_cli(tmp_path, monitored_model, "--since", "yesterday")
    assert done.returncode == 2 and "--since" in done.stderr
    done = run_monitor_cli(tmp_path, monitored_model, "--since", "1h")
    assert done.returncode == 3 and "INSUFFICIENT" in done.stdout


def test_card_reference_is_checked_against_its_sha256(
    monitored_model: Path,
    tmp_path: Path,
) -> None:
    from chestct.inference.folder import load_folder
    from chestct.inference.loaded import ModelRefused

    folder = tmp_path / "model"
    shutil.copytree(monitored_model, folder)
    profile = json.loads((folder / REFERENCE_FILE).read_text())
    profile["n"] += 1
    (folder / REFERENCE_FILE).write_text(json.dumps(profile))
    with pytest.raises(ModelRefused, match=r"monitoring\.sha256"):
        load_folder(folder)


# --------------------------------------------------------------------------- refused slices


def new_scanner(img: np.ndarray) -> np.ndarray:
    """A scanner with a wider field and another display curve: the input checks refuse it."""
    return gamma(zoom_out(img, 0.5), 2.0)


@needs_promtool
def test_refused_slices_are_drift_in_monitor_metrics_and_alert(
    monitored_model: Path, tmp_path: Path
) -> None:
    """105 of 120 slices refused (422) by the input checks: the monitor says DRIFT (exit 1)
    on the refused rate with its reason; /metrics counts them apart from answered ones and the
    refused-rate alert fires. Before, only the 15 answered counted: INSUFFICIENT, exit 0."""
    client = serve(monitored_model, tmp_path)
    statuses = []
    for i in range(120):
        img = ct_slice(60_000 + i, balanced(i))
        img = img if i % 8 == 0 else new_scanner(img)
        resp = client.post("/predict", data=encode(img), content_type="image/png")
        statuses.append(resp.status_code)
        if resp.status_code == 422:
            assert resp.get_json()["reason"] == "flat_graphic"
    assert statuses.count(422) == 105 and statuses.count(200) == 15

    done = run_monitor_cli(tmp_path, monitored_model, "--last", "120")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "105 of 120 requests refused (422): flat_graphic 105" in done.stdout
    assert re.search(r"refused rate\s+0\.875 vs expected 0\.000 .*DRIFT", done.stdout)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["verdict"] == "drift" and report["drifted"] == ["refused_rate"]
    assert report["window"] == {**report["window"], "n": 15, "requests": 120, "refused": 105}
    assert report["rates"]["refused"]["reasons"] == {"flat_graphic": 105}
    # Too few answers to judge the signals: not judged, not drift.
    assert not any(s.get("judged") for s in report["signals"].values())

    text = client.get("/metrics").get_data(as_text=True)
    assert scraped(text, "chestct_refusals_total") == [({"reason": "flat_graphic"}, 105.0)]
    answered_ood = scraped(text, "chestct_ood_predictions_total")
    assert len(answered_ood) == 1 and answered_ood[0][1] <= 15  # answers only
    rates = {labels["flag"]: v for labels, v in scraped(text, "chestct_window_rate")}
    assert rates["refused"] == pytest.approx(105 / 120)
    assert scraped(text, "chestct_window_requests") == [({}, 120.0)]
    series = {
        name: scraped(text, name)
        for name in ("chestct_window_rate", "chestct_reference_rate", "chestct_window_requests")
    }
    inputs, expr = promtool_inputs("ChestctRefusedRateHigh", series)
    test = {
        "rule_files": ["alerts.yml"],
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "15m",
                        "exp_samples": [
                            {
                                "labels": '{flag="refused", instance="app:8000", job="chestct"}',
                                "value": rates["refused"],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    proc = run_promtool(tmp_path, test)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_insufficient_exits_3_and_shows_no_drift(monitored_model: Path, tmp_path: Path) -> None:
    """Too few requests: INSUFFICIENT, exit 3, and no row reads DRIFT, even for a shift the
    rule would call drift with more requests (before: exit 0 with DRIFT rows under it)."""
    client = serve(monitored_model, tmp_path)
    send(client, 30, zoomed, lambda i: "normal")
    done = run_monitor_cli(tmp_path, monitored_model)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "INSUFFICIENT" in done.stdout and "DRIFT" not in done.stdout.replace("INSUFF", "")
    assert "too few requests to judge: 30" in done.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["verdict"] == "insufficient" and report["drifted"] == []
    assert not any(s.get("drift") for s in report["signals"].values())
    page = (tmp_path / "report" / "report.html").read_text()
    assert "class='drift'" not in page and ">DRIFT<" not in page


def test_report_states_its_rule_and_marks_large_but_insignificant_shifts(
    monitored_model: Path, tmp_path: Path
) -> None:
    """A PSI over the threshold whose test is not significant is not drift, and the row says
    why instead of "ok" (before: rows at PSI 0.80-0.84 read "ok"); the page states the rule."""
    from chestct.monitoring.drift import Thresholds, rule_text
    from chestct.monitoring.drift_report import render_html, row_mark, verdict_lines

    t = Thresholds.from_config(shipped(MonitorConfig))
    shift = {"psi": 0.82, "p_value": 0.2, "drift": False}
    assert row_mark(shift, vars(t)) == "not significant (PSI >= 0.25 but p >= 0.01)"
    assert row_mark({**shift, "psi": 0.05}, vars(t)) == "ok"
    assert row_mark({**shift, "p_value": 0.001, "drift": True}, vars(t)) == "DRIFT"
    client = serve(monitored_model, tmp_path)
    send(client, N_WINDOW, lambda img: img, balanced)
    done = run_monitor_cli(tmp_path, monitored_model, "--last", str(N_WINDOW))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["rule"] == rule_text(t)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "PSI is at least 0.25 AND" in page and "p &lt; 0.01" in page
    name = "mean_grey"
    report["signals"][name].update(psi=0.82, p_value=0.2, drift=False)
    assert "not significant" in render_html(report)
    assert any("not significant" in line for line in verdict_lines(report))


# --------------------------------------------------------------------------- rules, dashboard


@needs_promtool
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_alert_thresholds_match_the_monitor_config() -> None:
    from chestct.settings import load_settings

    cfg = load_settings(REPO).config.monitor
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "ChestctInputDrift",
        "ChestctOutOfDistributionRateHigh",
        "ChestctAbstainRateHigh",
        "ChestctRefusedRateHigh",
    } <= set(exprs)
    assert {"ChestctErrorRateHigh", "ChestctLatencyHigh"} <= set(exprs)
    assert exprs["ChestctInputDrift"].strip().endswith(f">= {cfg.psi_threshold:g}")
    for name in ("ChestctOutOfDistributionRateHigh", "ChestctAbstainRateHigh"):
        assert f"+ {cfg.rate_margin:.2f})" in exprs[name]
        assert f"chestct_window_predictions >= {cfg.min_requests}" in exprs[name]
    assert f"+ {cfg.rate_margin:.2f})" in exprs["ChestctRefusedRateHigh"]
    assert f"chestct_window_requests >= {cfg.min_requests}" in exprs["ChestctRefusedRateHigh"]


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bchestct_[a-z0-9_]+\b", expr))


def test_dashboard_panels_use_only_metrics_the_app_exports(
    monitored_model: Path,
    tmp_path: Path,
) -> None:
    client = serve(monitored_model, tmp_path)
    send(client, 60, lambda img: img, balanced)
    client.post("/predict", data=b"not an image", content_type="image/png")
    refused = client.post(
        "/predict", data=encode(new_scanner(ct_slice(1))), content_type="image/png"
    )
    assert refused.status_code == 422
    text = client.get("/metrics").get_data(as_text=True)
    exported = set(re.findall(r"^(chestct_[a-z0-9_]+)", text, re.MULTILINE))
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["panels"] and dashboard["uid"]
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names_in(target["expr"])
            assert names, f"panel {panel['title']!r} queries no chestct metric"
            assert names <= exported, (panel["title"], names - exported)
            used |= names
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert metric_names_in(rule["expr"]) <= exported, rule["alert"]
    assert "chestct_drift_psi" in used


@pytest.mark.parametrize(
    ("monitor", "message"),
    [
        ({"psi_threshold": 0}, "monitor.psi_threshold"),
        ({"p_value": 1.5}, "monitor.p_value"),
        ({"min_requests": 0}, "monitor.min_requests"),
        ({"rate_margin": 1.0}, "monitor.rate_margin"),
        ({"psi": 0.2}, "unknown key 'psi'"),
    ],
)
def test_bad_monitor_settings_name_the_key(tmp_path: Path, monitor: dict, message: str) -> None:
    from chestct.settings import SettingsError, load_settings

    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "config" / "config.yaml").write_text(
        config_text({"monitor": monitor}), encoding="utf-8"
    )
    with pytest.raises(SettingsError, match=message):
        load_settings(tmp_path)


def test_metadata_and_settings_reach_the_monitoring(
    monitored_model: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    config = {"model_dir": str(monitored_model), "monitor": {"live_window": 7}}
    (tmp_path / "config" / "config.yaml").write_text(config_text(config), encoding="utf-8")
    monkeypatch.setenv("CHESTCT_ROOT", str(tmp_path))
    client = create_app().test_client()
    meta = client.get("/metadata").get_json()["monitoring"]
    assert meta["live_window"] == 7 and meta["reference_images"] == 200
    send(client, 10, lambda img: img, balanced)
    # Each worker keeps only its latest monitor.live_window predictions in the drift window.
    text = client.get("/metrics").get_data(as_text=True)
    assert scraped(text, "chestct_window_predictions") == [({}, 7.0)]


# --------------------------------------------------------------------------- acquisition signals

ACQUISITION = ("body_share", "body_aspect", "background", "body_p50")


def test_acquisition_signals_follow_zoom_and_grey_level() -> None:
    """The body box's share of the frame grows with a zoom; the surround and the body get
    brighter with another scanner's grey level; the body's aspect follows its framing."""
    from chestct.monitoring.signals import image_signals

    original = ct_slice(5, size=256)
    base = image_signals(original)
    assert set(ACQUISITION) <= set(base)
    assert 0.3 < base["body_share"] < 0.8 and base["body_aspect"] > 1.0
    assert image_signals(zoomed(original))["body_share"] > base["body_share"] + 0.2
    bright = image_signals(brighter(original))
    assert bright["background"] == pytest.approx(base["background"] + 40, abs=3)
    assert bright["body_p50"] == pytest.approx(base["body_p50"] + 40, abs=3)
    assert bright["body_share"] == pytest.approx(base["body_share"], abs=0.02)
    # A blank frame has no body: the whole frame, its grey as background.
    blank = image_signals(np.full((64, 64), 7, np.uint8))
    assert blank["body_share"] == 1.0 and blank["background"] == 7.0


def test_serving_reuses_the_body_box_of_the_crop() -> None:
    """With the body crop on, prepare found the box already and serving reads the signals
    around it; a reference fitted for such a model reads the same box, so both agree. Without
    the crop the box is looked for on the sample grid, by serving and the reference alike."""
    from chestct.imaging.body import body_box
    from chestct.imaging.preparation import Preprocessing, prepare_slice
    from chestct.monitoring.signals import image_signals, request_signals

    greys = [ct_slice(seed, CLASSES[seed % 4], size=300) for seed in range(6)]
    proba = np.full((len(greys), 4), 0.25)
    for crop in ("body", "none"):
        served = []
        for grey in greys:
            prepared = prepare_slice(grey, Preprocessing(64, crop=crop))
            if crop == "body":
                assert prepared.body == body_box(grey, 0.0) and prepared.body.found
            else:
                assert prepared.body is None
            served.append(request_signals(proba[0], 1.0, None, None, grey, prepared.body))
        profile = fit_reference(
            classes=CLASSES,
            probabilities=proba,
            ood_distance=None,
            ood_threshold=None,
            abstain_threshold=None,
            greys=greys,
            body_crop=crop == "body",
        )
        for name in ACQUISITION:
            values = sorted(round(s[name], 6) for s in served)
            assert profile["signals"][name]["values"] == values, (crop, name)
    # The full-resolution box and the grid's agree to within a few hundredths of the frame.
    for grey in greys:
        fine, coarse = image_signals(grey, body_box(grey, 0.0)), image_signals(grey)
        assert fine["body_share"] == pytest.approx(coarse["body_share"], abs=0.05)


@pytest.mark.parametrize(
    ("transform", "expected"),
    [(zoomed, {"body_share"}), (brighter, {"background", "body_p50"})],
    ids=["zoom", "grey"],
)
def test_acquisition_shift_is_flagged_on_its_signal(
    monitored_model: Path,
    tmp_path: Path,
    transform: Callable[[np.ndarray], np.ndarray],
    expected: set[str],
) -> None:
    client = serve(monitored_model, tmp_path)
    send(client, N_WINDOW, transform, balanced)
    done = run_monitor_cli(tmp_path, monitored_model)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert expected <= set(report["drifted"]), report["drifted"]
    assert report["not_in_reference"] == []
    for name in expected:
        assert report["signals"][name]["psi"] >= 0.25
        assert re.search(rf"{name} +PSI .* DRIFT", done.stdout), done.stdout
    # The same on /metrics: histograms of every worker and the rolling PSI.
    text = client.get("/metrics").get_data(as_text=True)
    exported = {labels["signal"]: v for labels, v in scraped(text, "chestct_drift_psi")}
    assert all(exported[name] >= 0.25 for name in expected), exported
    for name in ACQUISITION:
        (count,) = scraped(text, f"chestct_signal_{name}_count")
        assert count[1] == N_WINDOW


def test_acquisition_signals_in_distribution_stay_quiet(
    monitored_model: Path, tmp_path: Path
) -> None:
    client = serve(monitored_model, tmp_path)
    send(client, N_WINDOW, lambda img: img, balanced, seed0=95_000)
    done = run_monitor_cli(tmp_path, monitored_model, "--last", str(N_WINDOW))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for name in ACQUISITION:
        assert report["signals"][name]["judged"] and not report["signals"][name]["drift"]
        assert report["signals"][name]["psi"] < 0.25, report["signals"][name]
    assert done.returncode == 0, done.stdout + done.stderr
    # The audit log keeps them as numbers.
    history = client.get("/history?limit=1", headers={"Authorization": f"Bearer {TOKEN}"})
    signals = history.get_json()["entries"][0]["signals"]
    assert all(isinstance(signals[name], float) for name in ACQUISITION)


def test_an_older_reference_without_acquisition_signals_still_monitors(
    monitored_model: Path, tmp_path: Path
) -> None:
    """A model promoted before these signals existed loads, serves, and is judged on the
    signals its reference has; the monitor says which ones it could not judge."""
    from chestct.fsutil import sha256_file

    folder = tmp_path / "old-model"
    shutil.copytree(monitored_model, folder)
    profile = json.loads((folder / REFERENCE_FILE).read_text())
    for name in ACQUISITION:
        del profile["signals"][name]
    (folder / REFERENCE_FILE).write_text(json.dumps(profile))
    card = json.loads((folder / "model.json").read_text())
    card["monitoring"]["sha256"] = sha256_file(folder / REFERENCE_FILE)
    (folder / "model.json").write_text(json.dumps(card))

    client = serve(folder, tmp_path)
    send(client, N_WINDOW, zoomed, balanced)
    text = client.get("/metrics").get_data(as_text=True)
    exported = {labels["signal"] for labels, _ in scraped(text, "chestct_drift_psi")}
    assert "foreground" in exported and not exported & set(ACQUISITION)
    done = run_monitor_cli(tmp_path, folder)
    assert done.returncode == 1, done.stdout + done.stderr  # the zoom still shows in foreground
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "foreground" in report["drifted"]
    assert sorted(report["not_in_reference"]) == sorted(ACQUISITION)
    assert "absent from this model's reference.json" in done.stdout
    assert all(n in done.stdout for n in ACQUISITION)
    for name in ACQUISITION:
        assert report["signals"][name] == {
            "kind": "continuous",
            "judged": False,
            "why": "not in the reference",
        }


def test_not_in_reference_lists_only_signals_the_window_measured() -> None:
    """A model without an OOD head measures no ood_ratio: that is no older reference."""
    from chestct.monitoring.drift import Thresholds, Window, compare
    from chestct.monitoring.signals import image_signals

    rng = np.random.default_rng(1)
    greys = [ct_slice(60_000 + i, size=128) for i in range(60)]
    profile = fit_reference(
        classes=CLASSES,
        probabilities=rng.dirichlet(np.ones(4), size=60),
        ood_distance=None,
        ood_threshold=None,
        abstain_threshold=None,
        greys=greys,
    )
    measured = [image_signals(g) for g in greys]
    window = Window(
        labels=[balanced(i) for i in range(60)],
        signals={k: [m[k] for m in measured] for k in measured[0]},
        abstain=[None] * 60,
        ood=[None] * 60,
    )
    report = compare(profile, window, Thresholds.from_config(shipped(MonitorConfig)), CLASSES)
    assert report["not_in_reference"] == []
    assert report["signals"]["ood_ratio"]["judged"] is False
    del profile["signals"]["body_share"]
    assert compare(profile, window, Thresholds.from_config(shipped(MonitorConfig)), CLASSES)[
        "not_in_reference"
    ] == ["body_share"]
