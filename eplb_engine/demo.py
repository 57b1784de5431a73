"""The live demo behind ``eplb demo``: the real service, a real R-rank CPU engine, the loop closed.

:func:`run_demo` starts ``eplb serve`` (auto-rebalance on, short interval and cooldown) on free
loopback ports and an R-rank engine (:func:`~eplb_engine.ep.run_engine`, gloo) whose ranks are
``EplbAgent``\\ s (:class:`~eplb_engine.served.ServedAgents`) of one deployment. The router is
skewed (Zipf); halfway through, the hot experts move (``drift_at``), so the service has to
rebalance again. The engine checks every step against the dense single-process computation.

While it runs, one line per ``progress_s``: step, balancedness of the engine's load since the
last line, the active version, the service's rollout state and the experts moved so far. At the
end a summary; :func:`summarize` computes it (and the ``--json`` object) from the engine's
records and the service's REST view. The service and every rank process are stopped on the way
out, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import torch

from eplb_engine.ep import EngineRun, RankContext, run_engine
from eplb_engine.model import MoEConfig
from eplb_engine.placement import balancedness
from eplb_engine.served import ServedAgents
from eplb_engine.service import ServiceProcess, http_json

__all__ = ["DemoConfig", "run_demo", "summarize"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (``eplb demo`` flags)."""

    ranks: int = 4
    steps: int = 500
    layers: int = 4
    experts: int = 16
    redundant: int = 4  # extra slots in all (P = experts + redundant, a multiple of ranks)
    tokens_per_step: int = 64
    top_k: int = 2
    hidden: int = 32
    ffn: int = 64
    skew: float = 1.2
    seed: int = 0
    step_ms: float = 50.0
    drift_at: float = 0.5  # fraction of the steps after which the hot experts move (0: never)
    layers_per_step: int = 1
    period_steps: int = 4
    report_interval_s: float = 0.25
    rebalance_interval_s: float = 3.0
    cooldown_s: float = 3.0
    min_gain: float = 0.02
    window_s: float = 6.0
    rollout_timeout_s: float = 20.0
    progress_s: float = 1.0
    deployment: str = "demo"

    @property
    def num_slots(self) -> int:
        return self.experts + self.redundant

    @property
    def model(self) -> MoEConfig:
        return MoEConfig(num_layers=self.layers, num_experts=self.experts, top_k=self.top_k,
                         hidden=self.hidden, ffn=self.ffn, skew=self.skew, seed=self.seed)

    @property
    def drift_step(self) -> int | None:
        step = int(self.steps * self.drift_at)
        return step if 0 < step < self.steps else None

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.ranks < 2:
            raise ValueError("--ranks must be >= 2")
        if self.steps < 10:
            raise ValueError("--steps must be >= 10")
        if self.redundant < 0 or self.num_slots % self.ranks:
            raise ValueError(f"experts + redundant ({self.num_slots}) must be a multiple of "
                             f"--ranks ({self.ranks})")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError("--top-k must be in [1, experts]")
        if min(self.layers, self.tokens_per_step) < 1 or self.step_ms < 0:
            raise ValueError("--layers and --tokens must be >= 1, --step-ms >= 0")
        if self.rebalance_interval_s <= 0 or self.cooldown_s < 0:
            raise ValueError("--rebalance-interval-s must be > 0, --cooldown-s >= 0")
        if not 0 <= self.drift_at < 1:
            raise ValueError("--drift-at must be in [0, 1)")

    def serve_flags(self) -> list[str]:
        return [
            "--report-interval-s", f"{self.report_interval_s:g}",
            "--agreement-period-steps", str(self.period_steps),
            "--layers-per-step", str(self.layers_per_step),
            "--rebalance-interval-s", f"{self.rebalance_interval_s:g}",
            "--cooldown-s", f"{self.cooldown_s:g}",
            "--min-gain", f"{self.min_gain:g}",
            "--window-s", f"{self.window_s:g}",
            "--window-buckets", "24",
            "--rollout-timeout-s", f"{self.rollout_timeout_s:g}",
            "--expert-bytes", str(self.model.expert_bytes),
            "--shutdown-grace-s", "1",
            "--log-level", "warning",
        ]


class DriftingAgents(ServedAgents):
    """:class:`ServedAgents` whose router's hot experts move at ``drift_step`` (every rank at the
    same step, so the engine and its dense reference change together)."""

    def __init__(self, *args: Any, drift_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drift_step = drift_step

    def before_step(self, ctx: RankContext, step: int) -> None:
        super().before_step(ctx, step)
        if step == self.drift_step:
            model = ctx.model
            model.hot_order = torch.roll(model.hot_order, model.config.num_experts // 2, dims=1)
            model.bias = model.skew_bias(model.config.skew)


# ---------------------------------------------------------------------------------------------
# Live progress


class _Progress(threading.Thread):
    """Tails rank 0's progress file and polls the service; prints one line per ``every_s``."""

    def __init__(self, path: str, deployment_url: str, ranks: int, out: TextIO,
                 every_s: float) -> None:
        super().__init__(name="eplb-demo-progress", daemon=True)
        self.path, self.url, self.ranks, self.out, self.every_s = (
            path, deployment_url, ranks, out, every_s)
        self._stop_event = threading.Event()
        self._offset = 0
        self._partial = ""
        self._loads: np.ndarray | None = None
        self._step = -1
        self._version = 0
        self._start = time.monotonic()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5.0)

    def run(self) -> None:
        next_line = time.monotonic() + self.every_s
        while not self._stop_event.wait(0.2):
            with contextlib.suppress(Exception):  # progress is best effort, never fatal
                self._read()
                if time.monotonic() >= next_line:
                    next_line += self.every_s
                    self._print()

    def _read(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            record = json.loads(line)
            if record["kind"] != "step":
                continue
            self._step, self._version = record["step"], record["version"]
            if record["counted"] and record["loads"] is not None:
                loads = np.asarray(record["loads"], dtype=np.int64)
                self._loads = loads if self._loads is None else self._loads + loads

    def _print(self) -> None:
        if self._step < 0:
            self.out.write(f"  {time.monotonic() - self._start:5.1f}s  starting the engine\n")
            self.out.flush()
            return
        if self._loads is not None:
            per_layer = balancedness(self._loads, self.ranks)
            bal = f"balancedness {per_layer.mean():.3f} (worst layer {per_layer.min():.3f})"
        else:
            bal = "balancedness   -   (switching)           "
        self._loads = None
        status, dep = http_json("GET", self.url, timeout_s=1.0)
        _, listing = http_json("GET", f"{self.url}/rollouts", timeout_s=1.0)
        rollout = "-"
        moved = 0
        if status == 200 and isinstance(dep, dict):
            last = dep.get("rollout")
            if last:
                rollout = f"v{last['version']} {last['state']}"
        if isinstance(listing, dict):
            moved = sum(r["slots_changed"] for r in listing.get("rollouts", [])
                        if r["state"] == "applied")
        self.out.write(
            f"  {time.monotonic() - self._start:5.1f}s  step {self._step:5d}  {bal}  "
            f"active v{self._version}  rollout {rollout:<14} experts moved {moved}\n"
        )
        self.out.flush()


# ---------------------------------------------------------------------------------------------
# Summary


def _window(run: EngineRun, version: int, ranks: int) -> np.ndarray | None:
    """Per-layer balancedness of rank 0's summed step loads under ``version`` (counted steps)."""
    loads = [s.slot_loads for s in run.ranks[0].steps
             if s.version == version and s.counted and s.slot_loads is not None]
    if not loads:
        return None
    return balancedness(np.sum(loads, axis=0), ranks)


def summarize(run: EngineRun, ranks: int, service: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's result: balancedness before the first and after the last rebalance (the
    engine's own counts), rebalances, what moved, the longest pause, output error, consistency.

    ``service``: the REST views fetched before the service stopped (``deployment``,
    ``rollouts``), summarized too when given.
    """
    steps = run.ranks[0].steps
    first, last = steps[0].version, steps[-1].version
    before, after = _window(run, first, ranks), _window(run, last, ranks)
    switches = [s for r in run.ranks for s in r.extra.get("switches", [])]
    applied = [s for s in switches if s["error"] is None]
    stats = [s["stats"] for s in switches if s["stats"] is not None]
    rank0 = run.ranks[0].extra.get("switches", [])
    checked = [s.rel_error for s in steps if s.rel_error is not None]
    result: dict[str, Any] = {
        "balancedness_before": None if before is None else round(float(before.mean()), 4),
        "balancedness_after": None if after is None else round(float(after.mean()), 4),
        "balancedness_before_worst": None if before is None else round(float(before.min()), 4),
        "balancedness_after_worst": None if after is None else round(float(after.min()), 4),
        "rebalances": sum(1 for s in rank0 if s["error"] is None),
        "rebalances_failed": sum(1 for s in rank0 if s["error"] is not None),
        "max_output_rel_error": run.max_rel_error,
        "outputs_checked": len(checked),
        "versions_consistent": run.versions_consistent,
        "weights_consistent": all(r.weights_ok for r in run.ranks),
        "longest_pause_ms": round(max((s["max_step_pause_ms"] for s in stats), default=0.0), 3),
        "bytes_moved": sum(s["stats"]["bytes_moved"] for s in applied if s["stats"]),
        "transfers": sum(s["stats"]["transfers"] for s in applied if s["stats"]),
        "local_copies": sum(s["stats"]["local_copies"] for s in applied if s["stats"]),
        "slots_written": sum(s["stats"]["slots_written"] for s in applied if s["stats"]),
        "versions": sorted({s.version for s in steps}),
        "steps": len(steps),
        "ranks": ranks,
        "engine_seconds": round(run.seconds, 2),
    }
    if service is not None:
        rollouts = service.get("rollouts") or []
        dep = service.get("deployment") or {}
        result["experts_moved"] = sum(r["slots_changed"] for r in rollouts
                                      if r["state"] == "applied")
        result["service"] = {
            "active_version": dep.get("active_version"),
            "tokens_total": dep.get("tokens_total"),
            "bytes_moved": sum(r["bytes_moved"] for r in rollouts if r["state"] == "applied"),
            "rollouts": [
                {k: r[k] for k in ("version", "trigger", "state", "slots_changed", "bytes_moved",
                                   "duration_s", "switch_step")}
                for r in reversed(rollouts)
            ],
        }
    return result


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def print_summary(summary: dict[str, Any], urls: dict[str, str], cfg: DemoConfig,
                  out: TextIO) -> None:
    s = summary
    service = s.get("service") or {}
    states = [r["state"] for r in service.get("rollouts", [])]
    lines = [
        "",
        "summary",
        f"  balancedness     {s['balancedness_before']} -> {s['balancedness_after']} (mean over "
        f"layers; worst layer {s['balancedness_before_worst']} -> "
        f"{s['balancedness_after_worst']})",
        f"  rebalances       {s['rebalances']} applied, {s['rebalances_failed']} failed; versions "
        f"{' -> '.join(str(v) for v in s['versions'])}; service rollouts: "
        f"{', '.join(states) or 'none'}",
        f"  experts moved    {s.get('experts_moved', '?')} slots changed (service); the ranks "
        f"wrote {s['slots_written']} slots: {s['transfers']} experts received over the network "
        f"({_mb(s['bytes_moved'])}; the service counted {_mb(service.get('bytes_moved', 0))}) "
        f"and {s['local_copies']} copied within a rank",
        f"  longest pause    {s['longest_pause_ms']:.1f} ms in one step ({cfg.layers_per_step} "
        f"layer(s) per step)",
        f"  outputs          max relative error vs dense {s['max_output_rel_error']:.2e} over "
        f"{s['outputs_checked']} checked steps; every rank on the same version at every step: "
        f"{'yes' if s['versions_consistent'] else 'NO'}",
        f"  while it ran     REST {urls['rest']}   metrics {urls['metrics']}",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()


# ---------------------------------------------------------------------------------------------
# The run


def run_demo(cfg: DemoConfig, out: TextIO) -> dict[str, Any]:
    """Run the demo, printing progress and the summary to ``out``; returns the summary dict
    (with ``rest_url`` and ``metrics_url``). Stops the service and the ranks on any exit."""
    cfg.check()
    model = cfg.model
    with tempfile.TemporaryDirectory(prefix="eplb-demo-") as tmp, \
            ServiceProcess(cfg.serve_flags()) as service:
        deployment_url = f"{service.http_url}/v1/deployments/{cfg.deployment}"
        urls = {"rest": deployment_url, "metrics": f"{service.http_url}/metrics"}
        out.write(
            f"eplb demo: service gRPC {service.grpc_target}, REST {deployment_url}, "
            f"metrics {urls['metrics']}\n"
            f"  engine: {cfg.ranks} ranks (gloo, CPU) x {cfg.num_slots // cfg.ranks} slots, "
            f"{cfg.layers} MoE layers x {cfg.experts} experts (top-{cfg.top_k}, Zipf skew "
            f"{cfg.skew:g}), {cfg.tokens_per_step} tokens/step, {cfg.steps} steps"
            + (f", hot experts move at step {cfg.drift_step}" if cfg.drift_step else "")
            + f"\n  service: auto-rebalance every {cfg.rebalance_interval_s:g}s (min gain "
            f"{cfg.min_gain:g}, cooldown {cfg.cooldown_s:g}s), {cfg.layers_per_step} layer(s) "
            f"per step\n"
        )
        out.flush()
        progress_path = os.path.join(tmp, "progress.jsonl")
        hooks = DriftingAgents(
            service.grpc_target, cfg.deployment, period_steps=cfg.period_steps,
            timeout_s=30.0, step_interval_s=cfg.step_ms / 1e3, progress_path=progress_path,
            drift_step=cfg.drift_step,
        )
        progress = _Progress(progress_path, deployment_url, cfg.ranks, out, cfg.progress_s)
        progress.start()
        try:
            run = run_engine(
                cfg.ranks, cfg.steps, config=model, hooks=hooks, num_slots=cfg.num_slots,
                tokens_per_step=cfg.tokens_per_step, check_every=1,
                timeout_s=cfg.steps * cfg.step_ms / 1e3 * 3 + 120,
            )
        finally:
            progress.stop()
        views: dict[str, Any] = {}
        status, dep = http_json("GET", deployment_url)
        if status == 200:
            views["deployment"] = dep
        status, listing = http_json("GET", f"{deployment_url}/rollouts")
        if status == 200 and isinstance(listing, dict):
            views["rollouts"] = listing["rollouts"]
        summary = summarize(run, cfg.ranks, views)
        print_summary(summary, urls, cfg, out)
        return {**summary, "rest_url": urls["rest"], "metrics_url": urls["metrics"]}
