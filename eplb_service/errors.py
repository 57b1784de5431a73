"""Errors of the control plane, independent of the transport that reports them.

The gRPC layer maps :class:`Code` to a ``grpc.StatusCode`` and the REST layer to an HTTP status,
so the domain modules (deployments, rollouts, planning) never import grpc or FastAPI.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """What kind of failure; named after the gRPC status it maps to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # malformed message or body (HTTP 422)
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # well-formed but wrong for the current state
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # too big or too many
    NOT_FOUND = "NOT_FOUND"  # unknown deployment or rollout (HTTP 404)
    ALREADY_EXISTS = "ALREADY_EXISTS"  # a rollout is already running (HTTP 409)
    ABORTED = "ABORTED"  # the stream was superseded by a newer one for the same rank
    UNAVAILABLE = "UNAVAILABLE"  # shutting down, not the leader, or the store is down
    UNAUTHENTICATED = "UNAUTHENTICATED"  # missing or wrong bearer token (HTTP 401)


class EplbError(Exception):
    """A request the service refuses.

    Attributes:
        code: the kind of failure.
        message: one line naming the field or the state at fault, shown to the client.
        reason: a short, fixed metric label (``eplb_reports_rejected_total{reason=...}``).
    """

    def __init__(self, code: Code, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


class RolloutBusy(EplbError):
    """A rollout is already running for the deployment (one at a time)."""

    def __init__(self, deployment: str, rollout_id: str) -> None:
        super().__init__(
            Code.ALREADY_EXISTS,
            f"deployment {deployment!r} has rollout {rollout_id} in progress",
            "rollout_busy",
        )
        self.rollout_id = rollout_id
