"""Prometheus metrics of the predictor.

Under gunicorn every worker counts on its own; with PROMETHEUS_MULTIPROC_DIR set (the gunicorn
config does it) the counts live in shared files and GET /metrics adds all workers up, so a
scrape that lands on any worker sees the whole server. Each app gets its own registry, so
several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets around the expected 5-50 ms of one prediction on a CPU.
BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """The service's counters, histograms and gauges."""

    def __init__(self) -> None:
        disable_created_metrics()  # *_created series only double the scrape size
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "chestct_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "chestct_request_latency_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "chestct_predictions", "Predictions by predicted class", ["label"], registry=r
        )
        self.abstentions = Counter(
            "chestct_abstentions",
            "Predictions flagged abstain (entropy over the threshold)",
            registry=r,
        )
        self.ood = Counter(
            "chestct_ood_rejections",
            "Inputs judged not a chest CT slice: by input checks (reason) or by the "
            "feature-space distance (reason=feature_distance)",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "chestct_model_info",
            "The model version being served (value 1)",
            ["name", "version", "backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._served: tuple[str, str, str] | None = None

    def set_model(self, name: str, version: str, backend: str) -> None:
        """Point chestct_model_info at the version now served (0 for the one before)."""
        labels = (name, version, backend)
        if labels == self._served:
            return
        if self._served is not None:
            self.model_info.labels(*self._served).set(0)
        self.model_info.labels(*labels).set(1)
        self._served = labels

    def exposition(self) -> tuple[bytes, str]:
        """The text format: all workers' values when multiprocess mode is on."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
