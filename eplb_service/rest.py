"""The REST API (FastAPI): deployments, placements, load, rebalances, rollouts, metrics.

:func:`create_app` builds an app around an explicit :class:`~eplb_service.control.ControlPlane`
(no globals): handlers get it through the ``Control`` dependency. Every handler is ``async`` and
runs on the service's event loop, so it reads deployment state without locks; the planner runs on
its worker thread. OpenAPI at ``/docs`` (and ``/openapi.json``).

Errors are ``{"detail": "..."}`` naming the problem: 404 unknown deployment or rollout, 409 a
rollout is in flight (or being planned), 422 a bad body (FastAPI's list of field errors) or an
invalid map (one line from the placement validator).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from eplb_service import __version__
from eplb_service.balance import BalanceReport
from eplb_service.control import ControlPlane, RebalanceResult
from eplb_service.deployments import Deployment, WindowBalance
from eplb_service.errors import Code, EplbError
from eplb_service.planning import known_policies
from eplb_service.rollout import Rollout
from eplb_service.store import StoreError
from eplb_service.telemetry import CONTENT_TYPE

HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 422,
    Code.FAILED_PRECONDITION: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.UNAVAILABLE: 503,
    Code.UNAUTHENTICATED: 401,
}


# ------------------------------------------------------------------------------------------
# Models


class Shape(BaseModel):
    layers: int = Field(description="MoE layers L")
    experts: int = Field(description="logical experts E per layer")
    slots: int = Field(description="physical slots P per layer")
    ranks: int = Field(description="EP ranks R")
    nodes: int = Field(description="hosts N")


class Balancedness(BaseModel):
    mean: float = Field(description="mean over layers of mean/max rank load (1 = perfect)")
    worst: float = Field(description="lowest per-layer balancedness")
    worst_layer: int = Field(description="the layer with the lowest balancedness")
    imbalance_mean: float = Field(description="mean over layers of max/mean rank load - 1")


class RolloutView(BaseModel):
    id: str
    deployment: str
    version: int = Field(description="the placement version being rolled out")
    from_version: int
    trigger: str = Field(description="rebalance (REST), placement (REST PUT) or auto")
    state: str = Field(description="preparing, committed, applied, cancelled or failed")
    reason: str | None = Field(description="why it was cancelled or failed, or a note")
    timeout_s: float
    created_at: float = Field(description="unix seconds")
    committed_at: float | None = Field(description="every rank READY (unix seconds)")
    applied_at: float | None = Field(description="first rank APPLIED: the group switched")
    finished_at: float | None
    duration_s: float | None
    switch_step: int | None = Field(description="forward step the group switched at")
    ranks_ready: list[int]
    ranks_applied: list[int]
    ranks_not_ready: list[int]
    ranks_not_applied: list[int]
    slots_changed: int
    bytes_moved: int = Field(description="bytes moved as reported by the agents")
    plan: dict[str, Any] | None = Field(description="predicted balance and migration")


class RankView(BaseModel):
    rank: int
    connected: bool
    incarnation: str
    active_version: int | None
    step: int | None
    last_seen_age_s: float | None


class DeploymentOptionsView(BaseModel):
    expert_bytes: int | None
    num_groups: int


class DeploymentSummary(BaseModel):
    name: str
    shape: Shape
    ranks_connected: int
    active_version: int
    rollout: RolloutView | None = Field(description="the rollout in flight, else the last one")
    balancedness: Balancedness | None = Field(
        description="current window under the active placement; null while the window is empty"
    )
    tokens_total: int = Field(description="every count ingested (each report counted once)")
    last_report_age_s: float | None


class DeploymentDetail(DeploymentSummary):
    created_at: float
    latest_version: int = Field(description="highest version issued (cancelled ones included)")
    versions_kept: list[int] = Field(description="versions whose reports are still accepted")
    window_s: float
    window_tokens: int
    predicted_balancedness: float | None = Field(description="mean predicted by the last plan")
    options: DeploymentOptionsView
    ranks: list[RankView]


class DeploymentList(BaseModel):
    deployments: list[DeploymentSummary]


class PlacementDoc(BaseModel):
    """The GET form; PUT also accepts SGLang's ``--init-expert-location`` JSON (no version;
    other keys are ignored)."""

    model_config = ConfigDict(extra="ignore")
    version: int | None = Field(default=None, description="ignored by PUT")
    physical_to_logical_map: list[list[int]] = Field(description="[layers][slots] logical ids")


class LoadView(BaseModel):
    deployment: str
    active_version: int
    window_s: float
    tokens: int = Field(description="load in the window")
    load: list[list[int]] = Field(description="[layers][experts] tokens in the window")
    balancedness_per_layer: list[float] = Field(description="[layers] under the active placement")
    balancedness: Balancedness | None


class ExpertsView(BaseModel):
    """Per-expert detail that metrics never carry (docs/decisions/0009-metrics-cardinality.md)."""

    deployment: str
    active_version: int
    window_s: float
    layers: list[int] = Field(description="the layers returned (all, or the one asked for)")
    load: list[list[int]] = Field(description="[layers][experts] tokens in the window")
    replicas: list[list[int]] = Field(
        description="[layers][experts] replicas (slots) under the active placement (>= 1)"
    )
    load_per_replica: list[list[float]] = Field(
        description="[layers][experts] load / replicas: what each replica serves"
    )
    slots: list[list[list[int]]] = Field(
        description="[layers][experts] the slots holding the expert (rank = slot // S)"
    )
    balancedness_per_layer: list[float] = Field(description="[layers] under the active placement")


class RebalanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dry_run: bool = Field(default=False, description="plan only, start nothing")
    policy: str | None = Field(default=None, description="planner policy (service default)")
    max_moves: int | None = Field(default=None, ge=0, description="most slots that may change")
    min_gain: float | None = Field(
        default=None, ge=0, le=1, description="least rise of mean balancedness (default 0)"
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is not None and value not in known_policies():
            raise ValueError(f"unknown policy {value!r}; known: {', '.join(known_policies())}")
        return value


class RebalanceView(BaseModel):
    deployment: str
    policy: str
    dry_run: bool
    from_version: int
    before: Balancedness = Field(description="window under the active placement")
    after: Balancedness = Field(description="window under the plan (predicted)")
    gain: float = Field(description="after.mean - before.mean")
    moves: int = Field(description="slots whose expert changes")
    bytes: int | None = Field(description="weight bytes to move; null if expert_bytes unknown")
    migration: dict[str, Any]
    worth_it: bool
    reason: str | None = Field(description="why the plan is not rolled out")
    planner_seconds: float
    rollout_id: str | None = Field(description="set when a rollout started (202)")
    version: int | None = Field(description="the version being rolled out")
    physical_to_logical_map: list[list[int]] | None = Field(description="the plan (dry_run)")


class RolloutAccepted(BaseModel):
    rollout_id: str | None
    version: int
    state: str
    detail: str | None = None


class RolloutList(BaseModel):
    rollouts: list[RolloutView] = Field(description="newest first")


class Status(BaseModel):
    status: str
    version: str = __version__
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str


# ------------------------------------------------------------------------------------------
# Converters


def _balance_view(b: WindowBalance | None) -> Balancedness | None:
    if b is None:
        return None
    return Balancedness(
        mean=b.mean, worst=b.worst, worst_layer=b.worst_layer, imbalance_mean=b.imbalance_mean
    )


def _report_view(r: BalanceReport) -> Balancedness:
    return Balancedness(
        mean=r.balancedness_mean,
        worst=r.balancedness_worst,
        worst_layer=r.worst_layer,
        imbalance_mean=r.imbalance_mean,
    )


def _rollout_view(r: Rollout | None) -> RolloutView | None:
    return None if r is None else RolloutView(**r.to_dict())


def _age(then: float | None, now: float) -> float | None:
    return None if then is None else max(0.0, now - then)


def _summary(dep: Deployment, now: float) -> dict[str, Any]:
    t = dep.topology
    return {
        "name": dep.name,
        "shape": Shape(
            layers=t.num_layers, experts=t.num_experts, slots=t.num_slots,
            ranks=t.num_ranks, nodes=t.num_nodes,
        ),
        "ranks_connected": dep.ranks_connected,
        "active_version": dep.active_version,
        "rollout": _rollout_view(dep.last_rollout),
        "balancedness": _balance_view(dep.balance()),
        "tokens_total": dep.tokens_total,
        "last_report_age_s": _age(dep.last_report_at, now),
    }


def _rebalance_view(result: RebalanceResult) -> RebalanceView:
    o = result.outcome
    return RebalanceView(
        deployment=result.deployment,
        policy=result.policy,
        dry_run=result.dry_run,
        from_version=result.from_version,
        before=_report_view(o.before),
        after=_report_view(o.after),
        gain=o.gain,
        moves=o.moves,
        bytes=o.migration.bytes_moved,
        migration=o.migration.to_dict(),
        worth_it=o.worth_it,
        reason=o.reason,
        planner_seconds=o.seconds,
        rollout_id=None if result.rollout is None else result.rollout.id,
        version=None if result.rollout is None else result.rollout.version,
        physical_to_logical_map=o.placement.phy2log.tolist() if result.dry_run else None,
    )


# ------------------------------------------------------------------------------------------
# App


def get_control(request: Request) -> ControlPlane:
    control: ControlPlane = request.app.state.control
    if request.url.path.startswith("/v1/"):
        control.require_leader()  # followers and a replica without its store: 503 naming why
    return control


_OPEN_PATHS = ("/healthz", "/readyz")
_MUTATIONS = ("POST", "PUT", "PATCH", "DELETE")


class GuardMiddleware:
    """Pure ASGI: the bearer token (mutations always, reads with ``auth_reads``; constant-time
    comparison, the token never echoed) and a bound on request bodies (413)."""

    def __init__(self, app: Any, *, token: str | None, auth_reads: bool, max_body: int,
                 on_auth_failure: Callable[[], None]) -> None:
        self.app = app
        self.token = None if token is None else token.encode()
        self.auth_reads = auth_reads
        self.max_body = max_body
        self.on_auth_failure = on_auth_failure

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.token is not None and path not in _OPEN_PATHS and (
            method in _MUTATIONS or self.auth_reads
        ):
            why = self._refuse(headers.get("authorization", b""))
            if why is not None:
                self.on_auth_failure()
                await _respond(send, 401, why, [(b"www-authenticate", b'Bearer realm="eplb"')])
                return
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                await _respond(send, 400, "content-length: not a number")
                return
            if too_big:
                await _respond(send, 413, self._too_big(int(length)))
                return
        if length is None and method in _MUTATIONS:
            # A chunked body: read it whole (bounded) before the app sees it, then replay it.
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    await _respond(send, 413, self._too_big(size))
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            replayed = False

            async def replay() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    def _too_big(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds max_body_bytes={self.max_body} "
            "(raise it with --max-body-bytes or EPLB_MAX_BODY_BYTES)"
        )

    def _refuse(self, header: bytes) -> str | None:
        assert self.token is not None
        if not header:
            return "missing bearer token: send 'Authorization: Bearer <token>'"
        scheme, _, credential = header.partition(b" ")
        if scheme.lower() != b"bearer" or not credential.strip():
            return "malformed Authorization header: expected 'Bearer <token>'"
        if hmac.compare_digest(credential.strip(), self.token):
            return None
        return "invalid bearer token"


async def _respond(
    send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    })
    await send({"type": "http.response.body", "body": body})


Control = Annotated[ControlPlane, Depends(get_control)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "unknown deployment or rollout"},
    409: {"model": ErrorBody, "description": "a rollout is in flight or being planned"},
}


def create_app(
    control: ControlPlane,
    *,
    ready: Callable[[], str | None] = lambda: None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The REST app.

    Args:
        control: the control plane the handlers act on.
        ready: returns None when ready, else why not (for ``/readyz``).
        clock: unix seconds, for ages.
    """
    app = FastAPI(
        title="eplb",
        version=__version__,
        description="Control plane for expert-parallel load balancing of MoE inference.",
    )
    app.state.control = control
    app.add_middleware(
        GuardMiddleware,
        token=control.token,
        auth_reads=control.settings.auth_reads,
        max_body=control.settings.max_body_bytes,
        on_auth_failure=lambda: control.telemetry.auth_failures.labels("http").inc(),
    )

    @app.exception_handler(EplbError)
    async def _eplb_error(request: Request, exc: EplbError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=HTTP_STATUS[exc.code])

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the input, which fails to render for a hostile body with
        # Infinity/NaN (a 500); name the field and the problem only.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        control.on_store_error(exc)
        return JSONResponse(
            {"detail": f"store unavailable: {exc}; retry later"}, status_code=503
        )

    @app.get("/healthz", response_model=Status, tags=["health"])
    async def healthz() -> Status:
        """Liveness: the process and its event loop respond."""
        return Status(status="ok")

    @app.get(
        "/readyz",
        response_model=Status,
        tags=["health"],
        responses={503: {"model": Status, "description": "not ready"}},
    )
    async def readyz(response: Response) -> Status:
        """Readiness: both servers are up and the service accepts agents."""
        why = ready()
        if why is not None:
            response.status_code = 503
            return Status(status="not ready", detail=why)
        return Status(status="ready")

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(control: Control) -> Response:
        """Prometheus text format."""
        t = control.telemetry
        t.refresh(
            control.deployments.values(), now=clock(),
            per_layer=control.settings.per_layer_metrics,
        )
        return Response(t.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/deployments", response_model=DeploymentList, tags=["deployments"])
    async def list_deployments(control: Control) -> DeploymentList:
        """Every deployment with a summary, by name."""
        now = clock()
        return DeploymentList(
            deployments=[
                DeploymentSummary(**_summary(control.deployments[name], now))
                for name in sorted(control.deployments)
            ]
        )

    @app.get(
        "/v1/deployments/{name}", response_model=DeploymentDetail, tags=["deployments"],
        responses=_ERRORS,
    )
    async def get_deployment(name: str, control: Control) -> DeploymentDetail:
        """Shape, connected ranks, versions, the current or last rollout, balancedness of the
        window under the active placement, tokens ingested and per-rank status."""
        dep = control.get(name)
        now = clock()
        ranks = [
            RankView(
                rank=r,
                connected=r in dep.links,
                incarnation=dep.ranks[r].incarnation if r in dep.ranks else "",
                active_version=dep.ranks[r].active_version if r in dep.ranks else None,
                step=dep.ranks[r].step if r in dep.ranks else None,
                last_seen_age_s=_age(dep.ranks[r].last_seen, now) if r in dep.ranks else None,
            )
            for r in range(dep.topology.num_ranks)
        ]
        return DeploymentDetail(
            **_summary(dep, now),
            created_at=dep.created_at,
            latest_version=dep.latest_version,
            versions_kept=dep.window.versions,
            window_s=dep.window.span_s,
            window_tokens=int(dep.window.total().sum()),
            predicted_balancedness=dep.last_predicted,
            options=DeploymentOptionsView(
                expert_bytes=dep.options.expert_bytes, num_groups=dep.options.num_groups
            ),
            ranks=ranks,
        )

    @app.get(
        "/v1/deployments/{name}/placement", response_model=PlacementDoc, tags=["placement"],
        responses=_ERRORS,
    )
    async def get_placement(name: str, control: Control) -> PlacementDoc:
        """The active placement: ``{"version", "physical_to_logical_map": [[...]]}``."""
        version, placement = control.get_placement(name)
        return PlacementDoc(version=version, physical_to_logical_map=placement.phy2log.tolist())

    @app.put(
        "/v1/deployments/{name}/placement",
        response_model=RolloutAccepted,
        status_code=202,
        tags=["placement"],
        responses={
            **_ERRORS,
            200: {"model": RolloutAccepted, "description": "equal to the active placement"},
            422: {"model": ErrorBody, "description": "invalid map (names the problem)"},
        },
    )
    async def put_placement(
        name: str, doc: PlacementDoc, control: Control, response: Response
    ) -> RolloutAccepted:
        """Rolls out the given map (202 with the rollout id). Same JSON as GET; also SGLang's
        ``--init-expert-location`` JSON. A map equal to the active one changes nothing (200)."""
        rollout = await control.put_placement(name, doc.physical_to_logical_map)
        if rollout is None:
            response.status_code = 200
            dep = control.get(name)
            return RolloutAccepted(
                rollout_id=None, version=dep.active_version, state="unchanged",
                detail="the map equals the active placement",
            )
        response.headers["Location"] = f"/v1/deployments/{name}/rollouts/{rollout.id}"
        return RolloutAccepted(
            rollout_id=rollout.id, version=rollout.version, state=rollout.state.value
        )

    @app.get(
        "/v1/deployments/{name}/load", response_model=LoadView, tags=["deployments"],
        responses=_ERRORS,
    )
    async def get_load(name: str, control: Control) -> LoadView:
        """The window's logical load ``[L][E]`` and per-layer balancedness under the active
        placement."""
        dep = control.get(name)
        load = dep.window.total()
        balance = dep.balance()
        per_layer = (
            [1.0] * dep.topology.num_layers if balance is None else balance.per_layer.tolist()
        )
        return LoadView(
            deployment=dep.name,
            active_version=dep.active_version,
            window_s=dep.window.span_s,
            tokens=int(load.sum()),
            load=load.tolist(),
            balancedness_per_layer=per_layer,
            balancedness=_balance_view(balance),
        )

    @app.get(
        "/v1/deployments/{name}/experts", response_model=ExpertsView, tags=["deployments"],
        responses={**_ERRORS, 422: {"model": ErrorBody, "description": "layer out of range"}},
    )
    async def get_experts(name: str, control: Control, layer: int | None = None) -> ExpertsView:
        """Per-layer, per-expert window load and replica count under the active placement
        (``?layer=N`` for one layer). Per-expert data lives here, never in /metrics."""
        dep = control.get(name)
        num_layers = dep.topology.num_layers
        if layer is not None and not 0 <= layer < num_layers:
            raise EplbError(
                Code.INVALID_ARGUMENT, f"layer: {layer} is not in 0..{num_layers - 1}", "layer"
            )
        layers = list(range(num_layers)) if layer is None else [layer]
        load = dep.window.total()[layers]
        placement = dep.active_placement
        replicas = placement.logcnt[layers]
        log2phy = placement.log2phy[layers]
        balance = dep.balance()
        per_layer = [1.0] * num_layers if balance is None else balance.per_layer.tolist()
        return ExpertsView(
            deployment=dep.name,
            active_version=dep.active_version,
            window_s=dep.window.span_s,
            layers=layers,
            load=load.tolist(),
            replicas=replicas.tolist(),
            load_per_replica=(load / replicas).tolist(),
            slots=[[[int(x) for x in row if x >= 0] for row in lay] for lay in log2phy.tolist()],
            balancedness_per_layer=[per_layer[i] for i in layers],
        )

    @app.post(
        "/v1/deployments/{name}/rebalance",
        response_model=RebalanceView,
        tags=["rollouts"],
        responses={
            **_ERRORS,
            202: {"model": RebalanceView, "description": "a rollout started"},
        },
    )
    async def rebalance(
        name: str,
        control: Control,
        response: Response,
        body: Annotated[RebalanceBody | None, Body()] = None,
    ) -> RebalanceView:
        """Plans from the current window. ``dry_run``: returns the prediction (and the map).
        Otherwise starts a rollout when the plan gains (> 0 and >= ``min_gain``, at most
        ``max_moves`` slots): 202 with ``rollout_id``; else 200 with ``reason``."""
        body = body or RebalanceBody()
        result = await control.rebalance(
            name,
            dry_run=body.dry_run,
            policy=body.policy,
            min_gain=body.min_gain,
            max_moves=body.max_moves,
        )
        if result.rollout is not None:
            response.status_code = 202
            response.headers["Location"] = (
                f"/v1/deployments/{name}/rollouts/{result.rollout.id}"
            )
        return _rebalance_view(result)

    @app.get(
        "/v1/deployments/{name}/rollouts", response_model=RolloutList, tags=["rollouts"],
        responses=_ERRORS,
    )
    async def list_rollouts(name: str, control: Control) -> RolloutList:
        """Recent rollouts of the deployment, newest first."""
        dep = control.get(name)
        return RolloutList(
            rollouts=[RolloutView(**r.to_dict()) for r in reversed(dep.rollouts.values())]
        )

    @app.get(
        "/v1/deployments/{name}/rollouts/{rollout_id}", response_model=RolloutView,
        tags=["rollouts"], responses=_ERRORS,
    )
    async def get_rollout(name: str, rollout_id: str, control: Control) -> RolloutView:
        """One rollout: state, timings, ranks ready/applied."""
        dep = control.get(name)
        rollout = dep.rollouts.get(rollout_id)
        if rollout is None:
            raise EplbError(
                Code.NOT_FOUND, f"deployment {name!r} has no rollout {rollout_id!r}", "not_found"
            )
        return RolloutView(**rollout.to_dict())

    return app
