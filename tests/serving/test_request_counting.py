"""Every answered request is counted by endpoint and status, with its latency
(chestct.serving.metrics.ServiceMetrics.answered, which keeps the labelled children)."""

from __future__ import annotations

import pytest

from chestct.serving.metrics import MULTIPROC_ENV, ServiceMetrics


def test_answered_counts_each_request_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    metrics = ServiceMetrics()
    for _ in range(3):
        metrics.answered("/predict", 200, 0.004)
    metrics.answered("/predict", 422, 0.003)
    metrics.answered("/health", 200, 0.0005)
    text = metrics.exposition()[0].decode()
    assert 'chestct_requests_total{endpoint="/predict",status="200"} 3.0' in text
    assert 'chestct_requests_total{endpoint="/predict",status="422"} 1.0' in text
    assert 'chestct_requests_total{endpoint="/health",status="200"} 1.0' in text
    assert 'chestct_request_latency_seconds_count{endpoint="/predict"} 4.0' in text
    assert 'chestct_request_latency_seconds_bucket{endpoint="/predict",le="0.005"} 4.0' in text
