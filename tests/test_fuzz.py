"""bench/fuzz.py's request strategies through Flask's test client (100 examples, fixed seed).

The bench runs them by the thousand against real gunicorn; here CI checks the same property on
a derandomised sample: no 5xx, every 4xx is problem+json, and the app still predicts after.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from chestct.serving import create_app
from test_serving_support import model_dir, multipart, slice_png  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def load_fuzz():
    spec = importlib.util.spec_from_file_location("chestct_bench_fuzz", REPO / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzz()
SEEDS = fuzz.good_images()


def test_fuzzed_requests_never_get_a_5xx(model_dir: Path) -> None:  # noqa: F811
    app = create_app(
        {"MODEL_DIR": str(model_dir), "MAX_CONTENT_LENGTH": 1024 * 1024, "MC_DROPOUT_SAMPLES": 2}
    )
    client = app.test_client()
    tally = fuzz.Tally(fuzz.Counter(), [])

    @settings(
        max_examples=100,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(fuzz.requests(SEEDS))
    def check(request) -> None:
        resp = client.open(
            request.path,
            method=request.method,
            data=request.body,
            content_type=request.content_type,
        )
        tally.record(request, resp.status_code, resp.mimetype == "application/problem+json")

    check()
    assert sum(tally.statuses.values()) >= 100
    assert tally.failures == []
    assert any(400 <= s < 500 for s in tally.statuses)  # the strategies do reach the checks
    resp = client.post("/predict", **multipart(slice_png(3)))
    assert resp.status_code == 200 and resp.get_json()["label"]
