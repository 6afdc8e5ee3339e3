"""The shape of the serving code (issue #13): a small app factory over blueprints, and an
inference core without the web framework, so that evaluate's research helpers, bench/ and the
service share one implementation of the model's maths."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from chestct.serving import create_app
from model_folder import slice_png

SRC = Path(__file__).resolve().parents[2] / "src" / "chestct"
FACTORY_MAX_LINES = 60  # one screen, like the Flask tutorial's create_app
WEB = ("flask", "werkzeug", "chestct.serving")


def test_create_app_fits_on_one_screen() -> None:
    lines, _ = inspect.getsourcelines(create_app)
    assert len(lines) <= FACTORY_MAX_LINES, (
        f"create_app is {len(lines)} lines (at most {FACTORY_MAX_LINES}): put routes in a "
        "blueprint module and setup in chestct.serving.service"
    )


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_inference_core_imports_no_web_framework() -> None:
    written = {
        m for path in (SRC / "inference").glob("*.py") for m in _imports(path) if m.startswith(WEB)
    }
    assert not written, f"chestct/inference/ imports {sorted(written)}"
    # Nothing it imports pulls the web package in either.
    code = (
        "import sys, chestct.inference.predictor; "
        f"print(sorted(m for m in sys.modules if m.startswith({WEB!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", f"importing chestct.inference loads {out.strip()}"


def test_routes_live_in_blueprints(model_dir: Path) -> None:
    app = create_app({"MODEL_DIR": str(model_dir)})
    owners = {rule.rule: rule.endpoint.split(".")[0] for rule in app.url_map.iter_rules()}
    assert {owners[r] for r in ("/predict", "/predict/batch", "/explain")} == {"prediction"}
    operations = ("/", "/health", "/ready", "/metadata", "/metrics", "/history")
    assert {owners[r] for r in operations} == {"operations"}
    assert owners["/feedback"] == "feedback"


def test_an_unknown_test_config_key_is_named(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="MC_DROPOUT_SAMPLE"):
        create_app({"MODEL_DIR": str(model_dir), "MC_DROPOUT_SAMPLE": 3})


def test_settings_stay_typed(model_dir: Path) -> None:
    app = create_app({"MODEL_DIR": str(model_dir), "MC_DROPOUT_SAMPLES": 7, "LIVE_WINDOW": 9})
    settings = app.extensions["chestct"].settings
    assert settings.serving.mc_dropout_samples == 7 and settings.monitor.live_window == 9
    assert settings.model_dir == model_dir
    ours = {k for k in app.config if k.isupper() and k not in app.default_config}
    assert ours == set(), f"settings copied into app.config: {sorted(ours)}"


def test_predict_reports_its_steps_in_server_timing(model_dir: Path) -> None:
    """bench/serve.py splits a request's CPU by these steps."""
    client = create_app({"MODEL_DIR": str(model_dir)}).test_client()
    resp = client.post("/predict", data=slice_png(), content_type="image/png")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    steps = dict(
        (item.split(";")[0].strip(), float(item.split("dur=")[1]))
        for item in resp.headers["Server-Timing"].split(",")
    )
    expected = ["receive", "checks", "decode", "prepare", "infer", "analyse", "monitor"]
    assert list(steps) == expected
    assert all(ms >= 0 for ms in steps.values()) and steps["infer"] > 0
    assert "Server-Timing" not in client.get("/health").headers
