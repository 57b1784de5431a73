"""``eplb simulate-agents``: R real agents in one process, driven by synthetic skewed routing.

    eplb simulate-agents --target HOST:PORT --deployment NAME --ranks R --layers L --experts E
        --slots P [--nodes N] [--skew zipf:1.2|lognormal:1.0|hot|uniform] [--tokens-per-step T]
        [--top-k K] [--steps N | --duration S] [--seed S] [--json]

Each simulated rank is a real :class:`~worker_agent.agent.EplbAgent` (placement view, recorder,
snapshotter, version agreement, gRPC client); all ranks share one event-loop thread for their
streams, and the main thread drives them in lockstep: every step each rank routes ``T`` tokens
(top-``K`` of ``E`` experts, drawn from the skewed profile without replacement) through
``map_and_record`` on CPU, then :func:`~worker_agent.agent.step_lockstep` closes the step on
every rank with the in-band agreement reduced in memory.

``--fast`` is the load-generator mode for hundreds of ranks (DeepSeek-V3 shapes): each step each
rank records the expected counts of one layer (rotating) with ``record_counts`` instead of
routing tokens one by one.

Prints balancedness over time: per layer mean/max of the rank loads the simulator itself
observes (the ranks' counters) under the active placement, since the last line or the last
switch; mean over layers and the worst layer. ``--json`` sends those lines to stderr and prints
one JSON summary line on stdout, including ``tokens_sent``: every (token, expert) assignment
recorded, which equals the service's ``tokens_total`` once everything is acknowledged. On exit
the simulator flushes: it waits (``--flush-timeout``) until every delta is acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import numpy as np
import numpy.typing as npt

from eplb_service.cli import UsageError

if TYPE_CHECKING:
    import torch

    from worker_agent.agent import EplbAgent
    from worker_agent.runtime import AgentRuntime

SKEWS = ("zipf", "lognormal", "hot", "uniform")
_TARGET_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")


@dataclass(frozen=True)
class SimConfig:
    """A validated simulation (see the module docstring for the meaning of each field)."""

    target: str
    deployment: str
    ranks: int
    layers: int
    experts: int
    slots: int
    nodes: int = 1
    skew: str = "zipf:1.2"
    tokens_per_step: int = 256
    top_k: int = 8
    steps: int | None = 1000
    duration_s: float | None = None
    seed: int = 0
    step_interval_s: float = 0.0
    print_interval_s: float = 1.0
    flush_timeout_s: float = 30.0
    fast: bool = False
    ranks_per_channel: int = 64
    token: str | None = None
    tls_ca: str | None = None  # PEM CA of the service's certificate: connect with TLS

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(bool(_TARGET_RE.match(self.target)),
             f"--target must be HOST:PORT, got {self.target!r}")
        need(bool(_NAME_RE.match(self.deployment)),
             f"--deployment must match [A-Za-z0-9._-]{{1,63}}, got {self.deployment!r}")
        for name in ("ranks", "layers", "experts", "slots", "nodes", "tokens_per_step", "top_k"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        need(self.slots >= self.experts,
             f"--slots ({self.slots}) must be >= --experts ({self.experts})")
        need(self.slots % self.ranks == 0,
             f"--slots ({self.slots}) must be divisible by --ranks ({self.ranks})")
        need(self.ranks % self.nodes == 0,
             f"--ranks ({self.ranks}) must be divisible by --nodes ({self.nodes})")
        need(self.top_k <= self.experts,
             f"--top-k ({self.top_k}) must be <= --experts ({self.experts})")
        need((self.steps is None) != (self.duration_s is None),
             "give exactly one of --steps and --duration")
        need(self.steps is None or self.steps >= 1, "--steps must be >= 1")
        need(self.duration_s is None or self.duration_s > 0, "--duration must be > 0")
        need(self.step_interval_s >= 0, "--step-interval must be >= 0")
        need(self.print_interval_s > 0, "--print-interval must be > 0")
        need(self.flush_timeout_s >= 0, "--flush-timeout must be >= 0")
        need(self.ranks_per_channel >= 1, "--ranks-per-channel must be >= 1")
        parse_skew(self.skew)


def parse_skew(text: str) -> tuple[str, float | None]:
    """``zipf:1.2`` -> ``("zipf", 1.2)``; ``hot`` -> ``("hot", None)``. Raises UsageError."""
    kind, _, param = text.partition(":")
    if kind not in SKEWS:
        raise UsageError(f"--skew: unknown kind {kind!r}; one of {', '.join(SKEWS)}")
    if kind in ("hot", "uniform"):
        if param:
            raise UsageError(f"--skew {kind} takes no parameter, got {text!r}")
        return kind, None
    try:
        value = float(param) if param else 1.0
    except ValueError:
        raise UsageError(f"--skew: {param!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--skew {kind}: parameter must be > 0, got {value}")
    return kind, value


def routing_profile(config: SimConfig) -> npt.NDArray[np.float64]:
    """``[L, E]``: the probability that a routed token picks each logical expert (rows sum to 1)."""
    from eplb_service import workloads

    kind, param = parse_skew(config.skew)
    rng = np.random.default_rng(config.seed)
    L, E = config.layers, config.experts
    if kind == "zipf":
        return workloads.zipf_profile(L, E, rng, exponent=float(param or 1.0))
    if kind == "lognormal":
        return workloads.lognormal_profile(L, E, rng, sigma=float(param or 1.0))
    if kind == "hot":
        return workloads.hot_profile(L, E, rng) if E > 1 else workloads.uniform_profile(L, E)
    return workloads.uniform_profile(L, E)


def identity_map(layers: int, experts: int, slots: int) -> npt.NDArray[np.int64]:
    """``[L, P]``: the engines' initial placement, slot ``s`` holds expert ``s % E``."""
    return np.tile(np.arange(slots, dtype=np.int64) % experts, (layers, 1))


def balancedness(slot_load: npt.NDArray[np.int64], ranks: int) -> tuple[float, float]:
    """``[L, P]`` slot loads -> (mean over layers, worst layer) of mean/max rank load."""
    loads = slot_load.reshape(slot_load.shape[0], ranks, -1).sum(axis=2).astype(np.float64)
    peak = loads.max(axis=1)
    per_layer = np.divide(loads.mean(axis=1), peak, out=np.ones_like(peak), where=peak > 0)
    return float(per_layer.mean()), float(per_layer.min())


@dataclass
class SimStats:
    """What a run observed; ``summary()`` is the JSON line."""

    steps: int = 0
    tokens_sent: int = 0
    versions_seen: list[int] = field(default_factory=lambda: [0])
    switch_steps: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


class Simulation:
    """R agents and their synthetic routing, stepped from the calling thread.

    Thread-safety: every method runs on one driving thread (the simulated engines' thread);
    only the agents' clients run elsewhere (on the shared runtime).
    """

    def __init__(self, config: SimConfig, *, runtime: AgentRuntime | None = None) -> None:
        import torch

        from worker_agent.agent import EplbAgent
        from worker_agent.agreement import Lockstep
        from worker_agent.client import ClientOptions
        from worker_agent.runtime import AgentRuntime

        self.config = config
        self._torch = torch
        self.runtime = runtime or AgentRuntime(name="eplb-sim-agents")
        self._owns_runtime = runtime is None
        self.rng = np.random.default_rng(config.seed + 1)
        self.profile = routing_profile(config)
        self.log_profile = np.log(np.maximum(self.profile, 1e-300))  # [L, E]
        initial = identity_map(config.layers, config.experts, config.slots)
        metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        credentials = None
        if config.tls_ca is not None:
            import grpc

            with open(config.tls_ca, "rb") as ca:
                credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
        self.agents: list[EplbAgent] = []
        for rank in range(config.ranks):
            options = ClientOptions(
                metadata=metadata,
                credentials=credentials,
                channel_key=f"sim-{config.deployment}-{rank // config.ranks_per_channel}",
                backoff_initial_s=0.1, backoff_max_s=2.0,
            )
            self.agents.append(
                EplbAgent(
                    config.target, deployment=config.deployment, rank=rank,
                    world_size=config.ranks, num_experts=config.experts, phy2log=initial,
                    num_nodes=config.nodes, collective=Lockstep(), options=options,
                    runtime=self.runtime, recorder_backend="torch", start=False,
                )
            )
        for agent in self.agents:
            agent.start()
        self.stats = SimStats()
        self.last_switch_line: dict[str, Any] = {}
        self._fast_counts: tuple[int, torch.Tensor] | None = None  # (version, [L, P] int64)
        self._fast_tokens: list[int] = []  # tokens per layer of _fast_counts
        self._window_base = self._counters()
        self._window_start = time.monotonic()

    @property
    def active_version(self) -> int:
        return self.agents[0].active_version

    def reseed(self, seed: int) -> None:
        """Draw a new routing profile (same skew, new seed): the load moves, so a rebalance has
        something to gain again."""
        self.profile = routing_profile(replace(self.config, seed=seed))
        self.log_profile = np.log(np.maximum(self.profile, 1e-300))
        self._fast_counts = None

    # -- stepping ------------------------------------------------------------------------------

    def step(self) -> None:
        """One forward step on every rank: route and record, then close it in lockstep."""
        from worker_agent.agent import step_lockstep

        if self.config.fast:
            self._record_fast()
        else:
            self._route()
        before = self.active_version
        step_lockstep(self.agents)
        self.stats.steps += 1
        after = self.active_version
        if after != before:
            self.stats.versions_seen.append(after)
            self.stats.switch_steps.append(self.agents[0].agreement.steps)
            self.last_switch_line = self.window_line(version=before, reason=f"switch to v{after}")
            self.reset_window()

    def _route(self) -> None:
        """Top-K of E without replacement for R*T tokens per layer (Gumbel top-k, numpy), then
        each rank's ``[T, K]`` slice through its recorder."""
        c = self.config
        tokens = c.ranks * c.tokens_per_step
        for layer in range(c.layers):
            gumbel = -np.log(-np.log(self.rng.random((tokens, c.experts)) + 1e-300))
            scores = self.log_profile[layer] + gumbel
            if c.top_k < c.experts:
                topk = np.argpartition(-scores, c.top_k - 1, axis=1)[:, : c.top_k]
            else:
                topk = np.broadcast_to(np.arange(c.experts), (tokens, c.experts))
            ids = self._torch.from_numpy(np.ascontiguousarray(topk, dtype=np.int64))
            for rank, agent in enumerate(self.agents):
                lo = rank * c.tokens_per_step
                agent.map_and_record(layer, ids[lo : lo + c.tokens_per_step])
        self.stats.tokens_sent += c.layers * tokens * c.top_k

    def _record_fast(self) -> None:
        """Expected counts of one layer per rank (rotating) via ``record_counts``."""
        c = self.config
        counts = self._fast_slot_counts()
        step = self.stats.steps
        for rank, agent in enumerate(self.agents):
            layer = (step + rank) % c.layers
            agent.record_counts(layer, counts[layer])
            self.stats.tokens_sent += self._fast_tokens[layer]

    def _fast_slot_counts(self) -> torch.Tensor:
        """``[L, P]`` int64: T*K assignments per layer split over experts by the profile and
        evenly over each expert's replicas under the active map (cached per version)."""
        version = self.active_version
        if self._fast_counts is not None and self._fast_counts[0] == version:
            return self._fast_counts[1]
        c = self.config
        per_expert = np.floor(self.profile * c.tokens_per_step * c.top_k).astype(np.int64)
        phy2log = self.agents[0].view.host_phy2log()
        replicas = np.zeros_like(per_expert)
        rows = np.arange(c.layers)[:, None]
        np.add.at(replicas, (rows, phy2log), 1)
        slot_counts = per_expert[rows, phy2log] // replicas[rows, phy2log]
        self._fast_tokens = [int(v) for v in slot_counts.sum(axis=1)]
        tensor = self._torch.from_numpy(slot_counts)
        self._fast_counts = (version, tensor)
        return tensor

    # -- observation ---------------------------------------------------------------------------

    def _counters(self) -> npt.NDArray[np.int64]:
        total = self._torch.stack([agent.recorder.counters for agent in self.agents]).sum(0)
        return np.asarray(total.numpy(), dtype=np.int64)

    def reset_window(self) -> None:
        self._window_base = self._counters()
        self._window_start = time.monotonic()

    def window_balance(self) -> tuple[float, float, int]:
        """(mean, worst, tokens) of the current window under the active placement."""
        window = self._counters() - self._window_base
        mean, worst = balancedness(window, self.config.ranks)
        return mean, worst, int(window.sum())

    def window_line(self, *, version: int | None = None, reason: str = "") -> dict[str, Any]:
        """Closes the current window into ``stats.history`` (when it has load) and returns it."""
        mean, worst, tokens = self.window_balance()
        entry: dict[str, Any] = {
            "step": self.stats.steps,
            "version": self.active_version if version is None else version,
            "balancedness": round(mean, 4),
            "worst": round(worst, 4),
            "tokens": tokens,
            "window_s": round(time.monotonic() - self._window_start, 3),
        }
        if reason:
            entry["reason"] = reason
        if tokens:
            self.stats.history.append(entry)
        return entry

    # -- shutdown ------------------------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Snapshot every rank and wait (at most ``timeout_s``) until every delta is acked."""
        for agent in self.agents:
            agent.capture_final()

        async def flush_all() -> bool:
            results = await asyncio.gather(
                *(agent.client.flush_async(timeout_s) for agent in self.agents)
            )
            return all(results)

        try:
            return self.runtime.run(flush_all(), timeout_s + 5.0)
        except Exception:
            return False

    def close(self) -> None:
        """Stop every client (and the runtime if this simulation started it)."""

        async def stop_all() -> None:
            await asyncio.gather(*(agent.client.stop_async() for agent in self.agents))

        try:
            self.runtime.run(stop_all(), 10.0)
        finally:
            if self._owns_runtime:
                self.runtime.close()

    def summary(self, *, flushed: bool, elapsed_s: float) -> dict[str, Any]:
        stats = [agent.stats() for agent in self.agents]
        last = next((h for h in reversed(self.stats.history) if h["tokens"]), None)
        first = self.stats.history[0] if self.stats.history else None
        return {
            "deployment": self.config.deployment,
            "ranks": self.config.ranks,
            "steps": self.stats.steps,
            "elapsed_s": round(elapsed_s, 3),
            "tokens_sent": self.stats.tokens_sent,
            "tokens_acked": sum(s.client.tokens_acked for s in stats),
            "flushed": flushed,
            "active_version": self.active_version,
            "versions_seen": self.stats.versions_seen,
            "switch_steps": self.stats.switch_steps,
            "balancedness_initial": first["balancedness"] if first else None,
            "balancedness_final": last["balancedness"] if last else None,
            "balancedness_final_worst": last["worst"] if last else None,
            "reports_sent": sum(s.client.reports_sent for s in stats),
            "reports_resent": sum(s.client.reports_resent for s in stats),
            "reconnects": sum(max(0, s.client.connects - 1) for s in stats),
            "dropped_tokens": sum(s.client.dropped_tokens for s in stats),
            "agent_errors": sum(s.errors for s in stats),
        }


def run_simulation(config: SimConfig, *, json_mode: bool, out: TextIO = sys.stdout) -> int:
    """Runs the whole simulation: steps, periodic lines, flush, summary. Returns the exit code."""
    progress = sys.stderr if json_mode else out
    sim = Simulation(config)
    start = time.monotonic()
    next_print = start + config.print_interval_s
    flushed = False
    try:
        try:
            while True:
                if config.steps is not None and sim.stats.steps >= config.steps:
                    break
                if config.duration_s is not None and time.monotonic() - start >= config.duration_s:
                    break
                switches = len(sim.stats.switch_steps)
                sim.step()
                if len(sim.stats.switch_steps) > switches:  # the window that just closed
                    _print_line(sim.last_switch_line, progress)
                now = time.monotonic()
                if now >= next_print:
                    next_print = now + config.print_interval_s
                    _print_line(sim.window_line(), progress)
                    sim.reset_window()
                if config.step_interval_s:
                    time.sleep(config.step_interval_s)
        except KeyboardInterrupt:
            print("interrupted: flushing", file=progress)
        _print_line(sim.window_line(reason="end"), progress)
        flushed = sim.flush(config.flush_timeout_s)
        summary = sim.summary(flushed=flushed, elapsed_s=time.monotonic() - start)
    finally:
        sim.close()
    if json_mode:
        print(json.dumps(summary), file=out, flush=True)
    else:
        print(
            f"done: {summary['steps']} steps, tokens_sent={summary['tokens_sent']} "
            f"acked={summary['tokens_acked']} flushed={flushed} "
            f"versions={summary['versions_seen']} final balancedness="
            f"{summary['balancedness_final']}",
            file=out, flush=True,
        )
    return 0 if flushed else 1


def _print_line(entry: dict[str, Any], out: TextIO) -> None:
    reason = f" ({entry['reason']})" if "reason" in entry else ""
    print(
        f"step {entry['step']:>7} v{entry['version']:<3} balancedness {entry['balancedness']:.3f}"
        f" worst {entry['worst']:.3f} tokens {entry['tokens']}{reason}",
        file=out, flush=True,
    )


# ---------------------------------------------------------------------------------------------
# CLI


def _one_line_error(prog: str) -> Any:
    def error(message: str) -> NoReturn:
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    return error


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate-agents",
        help="run R simulated engine ranks (real agents) against a service",
        allow_abbrev=False,  # `--token X` must not silently mean `--token-file X`
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    parser.error = _one_line_error(parser.prog)
    parser.add_argument("--target", required=True, metavar="HOST:PORT",
                        help="the service's gRPC address")
    parser.add_argument("--deployment", required=True, metavar="NAME")
    parser.add_argument("--ranks", required=True, type=int, metavar="R", help="EP ranks")
    parser.add_argument("--layers", required=True, type=int, metavar="L", help="MoE layers")
    parser.add_argument("--experts", required=True, type=int, metavar="E",
                        help="logical experts per layer")
    parser.add_argument("--slots", required=True, type=int, metavar="P",
                        help="physical slots per layer (E + redundant), divisible by R")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="hosts (default 1)")
    parser.add_argument("--skew", default="zipf:1.2",
                        help="routing skew: zipf:A, lognormal:SIGMA, hot or uniform "
                        "(default zipf:1.2)")
    parser.add_argument("--tokens-per-step", type=int, default=256, metavar="T",
                        help="tokens each rank routes per step (default 256)")
    parser.add_argument("--top-k", type=int, default=8, metavar="K",
                        help="experts per token (default 8)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", help="forward steps (default 1000)")
    length.add_argument("--duration", type=float, metavar="S", help="run for S seconds")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--json", action="store_true",
                        help="progress to stderr, one JSON summary line on stdout")
    parser.add_argument("--step-interval", type=float, default=0.0, metavar="S",
                        help="sleep between steps (default 0)")
    parser.add_argument("--print-interval", type=float, default=1.0, metavar="S",
                        help="seconds between balancedness lines (default 1)")
    parser.add_argument("--flush-timeout", type=float, default=30.0, metavar="S",
                        help="at exit, wait at most this long for every report's ack")
    parser.add_argument("--fast", action="store_true",
                        help="load-generator mode: record_counts of one layer per rank per step")
    parser.add_argument("--ranks-per-channel", type=int, default=64, metavar="N",
                        help="streams sharing one gRPC connection (default 64)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="read the bearer token from FILE (default: env EPLB_TOKEN)")
    parser.add_argument("--tls-ca", default=None, metavar="FILE",
                        help="connect with TLS, trusting the service certificate's CA (PEM)")
    parser.set_defaults(func=run)


def _token_from_args(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip().splitlines()
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file!r}: {exc.strerror or exc}") from None
        if not token or not token[0].strip():
            raise UsageError(f"--token-file {args.token_file!r}: is empty")
        return token[0].strip()
    return os.environ.get("EPLB_TOKEN") or None


def config_from_args(args: argparse.Namespace) -> SimConfig:
    token = _token_from_args(args)
    if args.tls_ca is not None and not os.path.isfile(args.tls_ca):
        raise UsageError(f"--tls-ca {args.tls_ca!r}: no such file")
    steps = args.steps if args.steps is not None or args.duration is not None else 1000
    return SimConfig(
        target=args.target, deployment=args.deployment, ranks=args.ranks, layers=args.layers,
        experts=args.experts, slots=args.slots, nodes=args.nodes, skew=args.skew,
        tokens_per_step=args.tokens_per_step, top_k=args.top_k, steps=steps,
        duration_s=args.duration, seed=args.seed, step_interval_s=args.step_interval,
        print_interval_s=args.print_interval, flush_timeout_s=args.flush_timeout,
        fast=args.fast, ranks_per_channel=args.ranks_per_channel, token=token,
        tls_ca=args.tls_ca,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # raises UsageError before anything heavy is imported
    return run_simulation(config, json_mode=args.json)


__all__ = [
    "SimConfig",
    "Simulation",
    "balancedness",
    "config_from_args",
    "parse_skew",
    "register",
    "routing_profile",
    "run",
    "run_simulation",
]
