"""Every Prometheus metric of the service, defined in one place.

Each service instance owns a :class:`Telemetry` with its own ``CollectorRegistry`` (never the
global one), so several services can live in one process (tests) without clashing.

Label cardinality is bounded: ``deployment`` (registered deployments only), ``reason`` and
``result`` (fixed vocabularies below), ``policy`` (known policies). Never per-layer or per-expert
labels by default (issue 8: per-layer series only behind a setting; per-expert data is in REST).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
            "Slots whose expert changed in applied rollouts.",
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
            "Seconds since the deployment's last counted report (at scrape time).",
            ["deployment"],
            registry=r,
        )

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
        for metric in (
            self.agents_connected, self.reports_received, self.reports_duplicate, self.tokens,
            self.balancedness, self.balancedness_worst, self.imbalance_ratio,
            self.predicted_balancedness, self.active_version, self.slots_moved, self.bytes_moved,
            self.last_report_age,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(name)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
