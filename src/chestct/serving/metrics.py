"""Prometheus metrics of the predictor.

Under gunicorn every worker counts on its own; with PROMETHEUS_MULTIPROC_DIR set (the gunicorn
config does it) the counts live in shared files and GET /metrics adds all workers up, so a
scrape that lands on any worker sees the whole server, and the process_* metrics (memory,
CPU, open files) come once per live worker, labelled `pid`. Each app gets its own registry, so
several apps in one process (tests) do not collide.

Refused slices (422 "not a chest CT slice") are counted apart from answered ones
(chestct_refusals_total by reason; chestct_ood_predictions_total counts answers flagged out of
distribution) and enter the rolling window as requests, so a scanner whose slices are mostly
refused shows as a refusal rate far above the reference's (chestct_window_rate{flag="refused"}).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chestct.monitoring.signals import (
    CLASS_SIGNAL,
    FLAGS,
    REFUSED,
    SIGNALS,
    bin_index,
    psi,
    reference_rates,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets around the expected 5-50 ms of one prediction on a CPU.
BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """The service's counters, histograms and gauges."""

    def __init__(self, window: int = 200) -> None:
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
        self.refusals = Counter(
            "chestct_refusals",
            "Slices refused unanswered (422, not a chest CT slice) by the input check's reason",
            ["reason"],
            registry=r,
        )
        self.ood_predictions = Counter(
            "chestct_ood_predictions",
            "Predictions answered but flagged out of distribution (feature-space distance "
            "over the card's threshold)",
            registry=r,
        )
        self.model_info = Gauge(
            "chestct_model_info",
            "The model version being served (value 1)",
            ["name", "version", "backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Per-request signals (chestct.monitoring.signals): histograms for dashboards, with the
        # same
        # fixed bins the reference profile and the drift figures use.
        self.signals = {
            sig.name: Histogram(
                f"chestct_signal_{sig.name}",
                f"Per prediction: {sig.help}",
                buckets=(*sig.edges, float("inf")),
                registry=r,
            )
            for sig in SIGNALS
        }
        self.window = LiveWindow(r, window)
        self._served: tuple[str, str, str] | None = None
        # The labelled children every request counts into, looked up once (labels() takes a
        # lock and checks its arguments on each call).
        self._answered: dict[tuple[str, int], tuple[Any, Any]] = {}

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        children = self._answered.get((endpoint, status))
        if children is None:
            children = (self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint))
            self._answered[(endpoint, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def set_model(self, name: str, version: str, backend: str) -> None:
        """Point chestct_model_info at the version now served (0 for the one before)."""
        labels = (name, version, backend)
        if labels == self._served:
            return
        if self._served is not None:
            self.model_info.labels(*self._served).set(0)
        self.model_info.labels(*labels).set(1)
        if self._served is not None:
            self.window.clear()  # the drift window belongs to one model version
        self._served = labels

    def observe(
        self,
        signals: Mapping[str, float | None],
        label: str,
        flags: Mapping[str, bool | None],
    ) -> None:
        """Record one prediction's signals: histograms and the rolling drift window."""
        bins: list[tuple[str, str]] = [(CLASS_SIGNAL, label)]
        for sig in SIGNALS:
            value = signals.get(sig.name)
            if value is None:
                continue
            self.signals[sig.name].observe(value)
            bins.append((sig.name, str(bin_index(sig.edges, value))))
        for flag in FLAGS:
            value = flags.get(flag)
            if value is not None:
                bins.append((flag, str(int(value))))
        bins.append((REFUSED, "0"))
        self.window.add(bins)

    def refuse(self, reason: str) -> None:
        """Count one refused slice, and put it in the rolling window as a refused request."""
        self.refusals.labels(reason).inc()
        self.window.add([(REFUSED, "1")])

    def exposition(
        self, reference: dict[str, Any] | None = None, min_requests: int = 50
    ) -> tuple[bytes, str]:
        """The text format: all workers' values when multiprocess mode is on, plus the drift
        figures of the summed window against `reference` (the served model's profile)."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            source = CollectorRegistry()
            multiprocess.MultiProcessCollector(source)
            WorkerProcessCollector(os.environ[MULTIPROC_ENV], source)
        else:
            source = self.registry
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DriftCollector(source.collect, reference, min_requests))
        return generate_latest(registry), CONTENT_TYPE_LATEST


class WorkerProcessCollector(Collector):
    """process_* metrics (prometheus_client's ProcessCollector) of every live worker, each
    labelled with its pid. Multiprocess mode has none of its own: the worker answering a scrape
    reads the others' /proc entries, found through their files in the metrics folder."""

    def __init__(self, folder: str, registry: CollectorRegistry) -> None:
        self.folder = folder
        registry.register(self)

    def pids(self) -> list[int]:
        """This worker and every worker with a metrics file that is still running."""
        from pathlib import Path

        found = {os.getpid()}
        for path in Path(self.folder).glob("*.db"):
            tail = path.stem.rsplit("_", 1)[-1]
            if tail.isdigit():
                found.add(int(tail))
        return sorted(pid for pid in found if Path(f"/proc/{pid}/stat").is_file())

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import ProcessCollector

        merged: dict[str, Metric] = {}
        for pid in self.pids():
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for family in collector.collect():
                out = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


WINDOW_METRIC = "chestct_window_count"


class LiveWindow:
    """The latest `size` requests of this worker (answered, and refused ones as
    ("refused", "1")), as counts per (signal, bin).

    The counts are gauges summed over live workers (multiprocess mode livesum), so any worker
    answering a scrape sees the whole server's window; a worker's share leaves with it.
    """

    def __init__(self, registry: CollectorRegistry, size: int = 200) -> None:
        self.size = size
        self.gauge = Gauge(
            WINDOW_METRIC,
            "Predictions in the rolling drift window by signal and bin (latest "
            "monitor.live_window per worker)",
            ["signal", "bin"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._children: dict[tuple[str, str], Any] = {}
        self._recent: deque[list[tuple[str, str]]] = deque()
        self._lock = threading.Lock()

    def _child(self, key: tuple[str, str]) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.gauge.labels(*key)
        return child

    def add(self, bins: list[tuple[str, str]]) -> None:
        with self._lock:
            self._recent.append(bins)
            if len(self._recent) <= self.size:
                for key in bins:
                    self._child(key).inc()
                return
            # A full window: one prediction in, the oldest out. Only bins whose count changes
            # are written (each write is a shared-file update in multiprocess mode).
            delta = dict.fromkeys(bins, 1)
            for key in self._recent.popleft():
                delta[key] = delta.get(key, 0) - 1
            for key, change in delta.items():
                if change:
                    self._child(key).inc(change)

    def clear(self) -> None:
        with self._lock:
            for child in self._children.values():
                child.set(0)
            self._recent.clear()


class DriftCollector(Collector):
    """Everything `collect` yields, plus the drift of the summed window from the reference:
    chestct_drift_psi{signal}, chestct_window_predictions, chestct_window_requests (answered
    and refused), chestct_window_rate{flag} and chestct_reference_rate{flag}. Computed at
    scrape time, never on the request path."""

    def __init__(
        self,
        collect: Callable[[], Iterator[Metric]],
        reference: dict[str, Any] | None,
        min_requests: int,
    ) -> None:
        self._collect = collect
        self.reference = reference
        self.min_requests = min_requests

    def collect(self) -> Iterator[Metric]:
        counts: dict[str, dict[str, float]] = {}
        for family in self._collect():
            if family.name == WINDOW_METRIC:
                for sample in family.samples:
                    per = counts.setdefault(sample.labels["signal"], {})
                    key = sample.labels["bin"]
                    per[key] = per.get(key, 0.0) + sample.value
            yield family
        n = sum(counts.get(CLASS_SIGNAL, {}).values())
        size = GaugeMetricFamily(
            "chestct_window_predictions",
            "Predictions in the rolling drift window (summed over workers)",
        )
        size.add_metric([], n)
        yield size
        refused = counts.get(REFUSED, {})
        requests = GaugeMetricFamily(
            "chestct_window_requests",
            "Requests in the rolling drift window, answered and refused (summed over workers)",
        )
        requests.add_metric([], refused.get("0", 0.0) + refused.get("1", 0.0))
        yield requests
        if self.reference is None:
            return
        rate = GaugeMetricFamily(
            "chestct_window_rate",
            "Share of the window's predictions flagged abstain or ood, and of its requests "
            "refused",
            labels=["flag"],
        )
        expected = GaugeMetricFamily(
            "chestct_reference_rate",
            "Share evaluate expected to be flagged (reference profile)",
            labels=["flag"],
        )
        expected_rates = reference_rates(self.reference)
        for flag in (*FLAGS, REFUSED):
            seen = counts.get(flag, {})
            total = seen.get("0", 0.0) + seen.get("1", 0.0)
            if total > 0:
                rate.add_metric([flag], seen.get("1", 0.0) / total)
            ref = expected_rates.get(flag)
            if ref is not None:
                expected.add_metric([flag], float(ref))
        yield rate
        yield expected
        if n < self.min_requests:
            return  # too few requests: a PSI would be noise (monitor.min_requests)
        drift = GaugeMetricFamily(
            "chestct_drift_psi",
            "Population stability index of the window against the reference, by signal",
            labels=["signal"],
        )
        signals = self.reference["signals"]
        for name, ref in signals.items():
            seen = counts.get(name, {})
            if name == CLASS_SIGNAL:
                observed = [seen.get(c, 0.0) for c in ref["categories"]]
            else:
                observed = [seen.get(str(i), 0.0) for i in range(len(ref["fractions"]))]
            if sum(observed) > 0:
                drift.add_metric([name], psi(ref["fractions"], observed))
        yield drift
