"""Every Prometheus metric of the service, defined in one place.

Each service instance owns a :class:`Telemetry` with its own ``CollectorRegistry`` (never the
global one), so several services can live in one process (tests) without clashing.

Label cardinality is bounded: ``deployment`` (registered deployments only), ``reason`` and
``result`` (fixed vocabularies below), ``policy`` (known policies). Never per-layer or per-expert
labels by default (issue 8: per-layer series only behind the ``per_layer_metrics`` setting;
per-expert data is in REST, ``GET /v1/deployments/{name}/experts``). See
docs/decisions/0009-metrics-cardinality.md.

Gauges that describe the current state of a deployment (balancedness, window age, stalled
rollouts, ...) are computed at scrape time by :meth:`Telemetry.refresh`. :func:`metrics_table`
renders every metric as the README's Markdown table; :func:`exported_names` lists the series names
a scrape can contain (what dashboards and alerts may query).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

if TYPE_CHECKING:
    from eplb_service.deployments import Deployment

# Values of the ``reason`` label of eplb_reports_rejected_total.
REJECT_REASONS = (
    "dtype",  # Tensor dtype not INT32/INT64
    "shape",  # Tensor shape != [L, P]
    "length",  # data bytes != prod(shape) * itemsize
    "negative",  # a negative count
    "stale_version",  # recorded under a version whose map is no longer kept
    "future_version",  # recorded under a version never issued
    "oversize",  # message above max_message_bytes
    "bad_hello",  # hello malformed (name, rank >= world_size, sizes, placement)
    "shape_mismatch",  # hello shape differs from the registered deployment
    "placement_mismatch",  # hello placement differs from the registered map of its version
    "protocol",  # message out of order (report before hello, second hello, ...)
    "rate_limited",  # a rank above max_reports_per_s
    "limit",  # a deployment above max_layers/max_experts/max_slots, or max_deployments reached
    "not_leader",  # this replica is a follower
    "store",  # the store did not answer
    "unauthenticated",  # missing or wrong bearer token
    "other",
)

# Values of the ``result`` label of eplb_rebalances_total.
REBALANCE_RESULTS = ("applied", "cancelled", "failed", "skipped_no_gain")

CONTENT_TYPE = CONTENT_TYPE_LATEST

# A rollout still in flight after this fraction of its timeout counts as stalled
# (eplb_rollouts_stalled): healthy rollouts finish in seconds, the timeout is minutes.
STALL_FRACTION = 0.5

# Metrics with a ``deployment`` label: dropped by Telemetry.forget_deployment.
_PER_DEPLOYMENT = (
    "agents_connected", "reports_received", "reports_duplicate", "tokens", "balancedness",
    "balancedness_worst", "imbalance_ratio", "predicted_balancedness", "active_version",
    "slots_moved", "bytes_moved", "last_report_age", "rank_silence_max", "window_age",
    "window_tokens", "rollout_age", "rollouts_stalled",
)


class Telemetry:
    """The service's metrics (attributes) on a private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.agents_connected = Gauge(
            "eplb_agents_connected",
            "Agent streams open (hello accepted), per deployment.",
            ["deployment"],
            registry=r,
        )
        self.deployments = Gauge(
            "eplb_deployments", "Deployments registered with this service.", registry=r
        )
        self.reports_received = Counter(
            "eplb_reports_received",
            "Load reports counted (duplicates excluded), per deployment.",
            ["deployment"],
            registry=r,
        )
        self.reports_duplicate = Counter(
            "eplb_reports_duplicate",
            "Load reports acknowledged again without counting (sequence already counted).",
            ["deployment"],
            registry=r,
        )
        self.reports_rejected = Counter(
            "eplb_reports_rejected",
            "Agent messages refused (stream closed with an error), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.reports_rejected.labels(reason)
        self.tokens = Counter(
            "eplb_tokens",
            "Token-to-expert assignments counted from load reports, per deployment.",
            ["deployment"],
            registry=r,
        )
        self.balancedness = Gauge(
            "eplb_balancedness",
            "Mean over layers of mean/max rank load of the current window under the active "
            "placement (1 = perfect).",
            ["deployment"],
            registry=r,
        )
        self.balancedness_worst = Gauge(
            "eplb_balancedness_worst",
            "Lowest per-layer balancedness of the current window under the active placement.",
            ["deployment"],
            registry=r,
        )
        self.imbalance_ratio = Gauge(
            "eplb_imbalance_ratio",
            "Mean over layers of max/mean rank load - 1 (0 = perfect), current window.",
            ["deployment"],
            registry=r,
        )
        self.predicted_balancedness = Gauge(
            "eplb_predicted_balancedness",
            "Mean balancedness the last plan predicted for the window it was made from.",
            ["deployment"],
            registry=r,
        )
        self.active_version = Gauge(
            "eplb_active_version", "Active placement version, per deployment.", ["deployment"],
            registry=r,
        )
        self.rebalances = Counter(
            "eplb_rebalances",
            "Rebalances by result: applied, cancelled, failed, skipped_no_gain.",
            ["deployment", "result"],
            registry=r,
        )
        self.rollouts_in_progress = Gauge(
            "eplb_rollouts_in_progress", "Rollouts preparing or committed.", registry=r
        )
        self.planner_seconds = Histogram(
            "eplb_planner_seconds",
            "Wall time of one planner run (in the planner thread).",
            ["policy"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.rollout_seconds = Histogram(
            "eplb_rollout_seconds",
            "Time from a rollout's start to its end, by result.",
            ["result"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.slots_moved = Counter(
            "eplb_slots_moved",
            "Experts moved: slots whose expert changed in applied rollouts.",
            ["deployment"],
            registry=r,
        )
        self.bytes_moved = Counter(
            "eplb_bytes_moved",
            "Expert weight bytes moved by applied rollouts (as reported by the agents).",
            ["deployment"],
            registry=r,
        )
        self.last_report_age = Gauge(
            "eplb_last_report_age_seconds",
            "Report lag: seconds since the deployment's last counted report (at scrape time).",
            ["deployment"],
            registry=r,
        )
        self.rank_silence_max = Gauge(
            "eplb_rank_silence_max_seconds",
            "Seconds since the least recently heard-from connected rank sent anything (report, "
            "heartbeat or plan ack); 0 without connected ranks.",
            ["deployment"],
            registry=r,
        )
        self.report_ingest_seconds = Histogram(
            "eplb_report_ingest_seconds",
            "Service-side latency of one counted load report: arrival to acknowledgement "
            "(decode, attribution, durable commit, window update).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.window_age = Gauge(
            "eplb_window_age_seconds",
            "Seconds of history the current load window covers (now minus the start of its "
            "oldest bucket, at most window_s; 0 when empty).",
            ["deployment"],
            registry=r,
        )
        self.window_tokens = Gauge(
            "eplb_window_tokens",
            "Tokens in the current load window.",
            ["deployment"],
            registry=r,
        )
        self.rollout_age = Gauge(
            "eplb_rollout_age_seconds",
            "Age of the rollout in flight (since it started or was resumed); 0 when none.",
            ["deployment"],
            registry=r,
        )
        self.rollouts_stalled = Gauge(
            "eplb_rollouts_stalled",
            f"1 while the deployment's rollout is still preparing or committed after "
            f"{STALL_FRACTION:g} of its timeout, else 0.",
            ["deployment"],
            registry=r,
        )
        self.layer_balancedness = Gauge(
            "eplb_layer_balancedness",
            "Per-layer mean/max rank load of the current window (only with the "
            "per_layer_metrics setting: L series per deployment).",
            ["deployment", "layer"],
            registry=r,
        )
        self._layer_series: dict[str, int] = {}  # deployment -> layers exported

        self.leader = Gauge(
            "eplb_leader",
            "1 while this replica holds the leader lease (always 1 with the memory store).",
            registry=r,
        )
        self.store_up = Gauge(
            "eplb_store_up", "1 while the store answers, 0 after a failed call.", registry=r
        )
        self.store_up.set(1)
        self.store_errors = Counter(
            "eplb_store_errors", "Failed store calls (each makes this replica step down).",
            registry=r,
        )
        self.leader_changes = Counter(
            "eplb_leader_acquired", "Times this replica acquired the leader lease.", registry=r
        )
        self.auth_failures = Counter(
            "eplb_auth_failures",
            "Requests refused for a missing or wrong bearer token, by transport.",
            ["transport"],
            registry=r,
        )
        for transport in ("grpc", "http"):
            self.auth_failures.labels(transport)

    def forget_deployment(self, name: str) -> None:
        """Drops every series labelled with ``name``."""
        for attr in _PER_DEPLOYMENT:
            with contextlib.suppress(KeyError):
                getattr(self, attr).remove(name)
        for result in REBALANCE_RESULTS:
            with contextlib.suppress(KeyError):
                self.rebalances.remove(name, result)
        self._drop_layers(name)

    def _drop_layers(self, name: str) -> None:
        for layer in range(self._layer_series.pop(name, 0)):
            with contextlib.suppress(KeyError):
                self.layer_balancedness.remove(name, str(layer))

    def refresh(
        self,
        deployments: Iterable[Deployment],
        *,
        now: float | None = None,
        mono: float | None = None,
        per_layer: bool = False,
    ) -> None:
        """Sets the scrape-time gauges of every deployment (event loop only).

        Args:
            deployments: the registered deployments.
            now: unix seconds (``time.time()``); mono: monotonic seconds (``time.monotonic()``).
            per_layer: export ``eplb_layer_balancedness`` (the ``per_layer_metrics`` setting).
        """
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        seen: set[str] = set()
        for dep in deployments:
            name = dep.name
            seen.add(name)
            for result in REBALANCE_RESULTS:  # every result exists from the start: rate() works
                self.rebalances.labels(name, result)
            self.slots_moved.labels(name)
            self.bytes_moved.labels(name)
            balance = dep.balance()  # expires old buckets first
            if balance is None:
                for gauge in (self.balancedness, self.balancedness_worst, self.imbalance_ratio):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
            else:
                self.balancedness.labels(name).set(balance.mean)
                self.balancedness_worst.labels(name).set(balance.worst)
                self.imbalance_ratio.labels(name).set(balance.imbalance_mean)
            if dep.last_report_at is not None:
                self.last_report_age.labels(name).set(max(0.0, now - dep.last_report_at))
            seen_at = [dep.ranks[r].last_seen for r in dep.links if r in dep.ranks]
            silent = [now - at for at in seen_at if at is not None]
            self.rank_silence_max.labels(name).set(max([0.0, *silent]))
            self.window_age.labels(name).set(window_age_s(dep.window, now))
            self.window_tokens.labels(name).set(0 if balance is None else balance.tokens)
            rollout = dep.rollout
            age = 0.0 if rollout is None else max(0.0, mono - rollout.started_mono)
            self.rollout_age.labels(name).set(age)
            stalled = rollout is not None and rollout.in_flight and (
                age >= STALL_FRACTION * rollout.timeout_s
            )
            self.rollouts_stalled.labels(name).set(1 if stalled else 0)
            if per_layer and balance is not None:
                for layer, value in enumerate(balance.per_layer.tolist()):
                    self.layer_balancedness.labels(name, str(layer)).set(value)
                self._layer_series[name] = len(balance.per_layer)
            else:
                self._drop_layers(name)
        for name in list(self._layer_series):
            if name not in seen:
                self._drop_layers(name)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def window_age_s(window: Any, now: float) -> float:
    """Seconds of history ``window`` (a :class:`~eplb_service.window.LoadWindow`) covers at
    ``now``: from the start of its oldest bucket, at most its span; 0 when it is empty."""
    buckets = getattr(window, "_buckets", None)  # read-only peek: LoadWindow keeps them private
    if not buckets:
        return 0.0
    start = buckets[0].index * window.bucket_s
    return float(min(window.span_s, max(0.0, now - start)))


def _wrappers(telemetry: Telemetry) -> list[MetricWrapperBase]:
    out = [v for v in vars(telemetry).values() if isinstance(v, MetricWrapperBase)]
    return sorted(out, key=lambda m: m._name)


def _exposed_name(metric: MetricWrapperBase) -> str:
    return f"{metric._name}_total" if metric._type == "counter" else metric._name


def metrics_table() -> str:
    """A Markdown table of every metric: name, type, labels, meaning (for the README)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in _wrappers(Telemetry()):
        labels = ", ".join(f"`{label}`" for label in m._labelnames) or "-"
        rows.append(f"| `{_exposed_name(m)}` | {m._type} | {labels} | {m._documentation} |")
    return "\n".join(rows)


def exported_names() -> frozenset[str]:
    """Every series name a scrape of the service can contain (counters with ``_total`` and
    ``_created``; histograms with ``_bucket``, ``_count``, ``_sum``, ``_created``)."""
    names: set[str] = set()
    for m in _wrappers(Telemetry()):
        if m._type == "counter":
            names |= {f"{m._name}_total", f"{m._name}_created"}
        elif m._type == "histogram":
            names |= {f"{m._name}{s}" for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(m._name)
    return frozenset(names)
