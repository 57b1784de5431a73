"""Service settings: the single source of truth for every knob of ``eplb serve``.

Every setting is one field of the frozen dataclass :class:`Settings`. Its value comes from, in
increasing priority:

1. the default below;
2. ``--config FILE`` (JSON, or TOML on Python >= 3.11), keys named exactly like the fields;
3. the environment variable ``EPLB_<FIELD NAME IN UPPER CASE>`` (e.g. ``EPLB_WINDOW_S=30``);
4. the command-line flag ``--<field-name-with-dashes>`` (e.g. ``--window-s 30``).

Validation happens once, in :meth:`Settings.__post_init__`; every error names the field (and
where the bad value came from when it was parsed from text). To add a setting, add a field with
``_setting(...)`` metadata: the flag, the environment variable, the help text and the README
table (:func:`settings_table`) all follow from it.

Per-deployment overrides (``expert_bytes``, ``num_groups``) live under ``deployments`` in the
config file (or ``EPLB_DEPLOYMENTS`` as JSON)::

    {"deployments": {"dsv3": {"expert_bytes": 44040192, "num_groups": 8}}}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

ENV_PREFIX = "EPLB_"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting is malformed or out of range; the message names the setting."""


@dataclass(frozen=True)
class DeploymentOptions:
    """Per-deployment planner inputs that agents do not report.

    Attributes:
        expert_bytes: bytes of one expert's weights (all its tensors), for the moved-bytes
            estimate of a plan; ``None`` when unknown.
        num_groups: expert groups of group-limited routing (DeepSeek-V3: 8); must divide E.
    """

    expert_bytes: int | None = None
    num_groups: int = 1

    def __post_init__(self) -> None:
        if self.expert_bytes is not None and (
            isinstance(self.expert_bytes, bool)
            or not isinstance(self.expert_bytes, int)
            or self.expert_bytes < 0
        ):
            raise ConfigError(f"expert_bytes must be an integer >= 0, got {self.expert_bytes!r}")
        if (
            isinstance(self.num_groups, bool)
            or not isinstance(self.num_groups, int)
            or self.num_groups < 1
        ):
            raise ConfigError(f"num_groups must be an integer >= 1, got {self.num_groups!r}")


# ------------------------------------------------------------------------------------------
# Parsers: text (env, CLI) or a JSON/TOML value -> a typed value. Raise ValueError on bad input.


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _parse_optional_int(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _parse_int(value)


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    else:
        raise ValueError(f"expected a number, got {value!r}")
    if not math.isfinite(result):
        raise ValueError(f"expected a finite number, got {value!r}")
    return result


def _parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _parse_optional_str(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _parse_str(value)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_deployments(value: Any) -> Mapping[str, DeploymentOptions]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected a JSON object: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object of deployment name -> options, got {value!r}")
    known = {f.name for f in dataclasses.fields(DeploymentOptions)}
    out: dict[str, DeploymentOptions] = {}
    for name, options in value.items():
        if isinstance(options, DeploymentOptions):
            out[str(name)] = options
            continue
        if not isinstance(options, Mapping):
            raise ValueError(f"[{name!r}]: expected an object, got {options!r}")
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"[{name!r}]: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        try:
            out[str(name)] = DeploymentOptions(
                expert_bytes=_parse_optional_int(options.get("expert_bytes")),
                num_groups=_parse_int(options.get("num_groups", 1)),
            )
        except (ValueError, ConfigError) as exc:
            raise ValueError(f"[{name!r}].{exc}") from None
    return MappingProxyType(out)


def _setting(
    default: Any,
    help: str,
    parse: Callable[[Any], Any],
    *,
    metavar: str | None = None,
    cli: bool = True,
    secret: bool = False,
) -> Any:
    """A :class:`Settings` field with its parser and help (``cli=False``: no flag, e.g. secrets;
    ``secret=True``: also left out of ``repr`` so it never reaches a log line)."""
    metadata = {"help": help, "parse": parse, "metavar": metavar, "cli": cli and not secret}
    if isinstance(default, Mapping):
        frozen = MappingProxyType(dict(default))
        return field(default_factory=lambda: frozen, metadata=metadata)
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Every setting of the service. Construct with keywords; invalid values raise ConfigError."""

    # Network
    host: str = _setting("127.0.0.1", "address both servers bind to", _parse_str, metavar="ADDR")
    grpc_port: int = _setting(50051, "gRPC port for agents (0 = any free port)", _parse_int)
    http_port: int = _setting(
        8080, "HTTP port for REST, /metrics and /docs (0 = any free port)", _parse_int
    )
    max_message_bytes: int = _setting(
        4 * 1024 * 1024,
        "largest agent message accepted; larger ones get RESOURCE_EXHAUSTED",
        _parse_int,
    )
    hello_timeout_s: float = _setting(
        10.0, "seconds a new stream may take to send its hello", _parse_float
    )
    # Pushed to agents (Settings message)
    report_interval_s: float = _setting(
        1.0, "agents send a load report this often (pushed to agents)", _parse_float
    )
    agreement_period_steps: int = _setting(
        16, "K: ranks agree on the placement version every K steps (pushed)", _parse_int
    )
    layers_per_step: int = _setting(
        0, "layers switched per step during a switch, 0 = all at once (pushed)", _parse_int
    )
    # Load window
    window_s: float = _setting(60.0, "span of the sliding load window in seconds", _parse_float)
    window_buckets: int = _setting(
        60, "time buckets of the window (its granularity is window_s / window_buckets)", _parse_int
    )
    versions_kept: int = _setting(
        8,
        "placement versions whose maps are kept for attributing reports; reports recorded "
        "under older versions are refused as stale",
        _parse_int,
    )
    # Planning and rollouts
    policy: str = _setting(
        "default", "planner policy of auto-rebalance and of REST rebalances naming none",
        _parse_str,
    )
    num_groups: int = _setting(
        1, "expert groups for deployments without an override (must divide E)", _parse_int
    )
    expert_bytes: int | None = _setting(
        None,
        "bytes of one expert's weights for deployments without an override (none = unknown)",
        _parse_optional_int,
        metavar="BYTES",
    )
    deployments: Mapping[str, DeploymentOptions] = _setting(
        {},
        'per-deployment overrides as JSON: {"NAME": {"expert_bytes": B, "num_groups": G}}',
        _parse_deployments,
        metavar="JSON",
    )
    rebalance_interval_s: float = _setting(
        0.0, "auto-rebalance: plan every this many seconds (0 = off)", _parse_float
    )
    min_gain: float = _setting(
        0.01,
        "auto-rebalance rolls out a plan only if mean balancedness rises by at least this",
        _parse_float,
    )
    cooldown_s: float = _setting(
        60.0, "auto-rebalance waits this long after a rollout ends", _parse_float
    )
    rollout_timeout_s: float = _setting(
        30.0,
        "a rollout not finished within this is cancelled (Cancel sent), unless a rank already "
        "switched: then it is marked applied with a note",
        _parse_float,
    )
    rollouts_kept: int = _setting(100, "finished rollouts remembered per deployment", _parse_int)
    planner_threads: int = _setting(1, "worker threads running the planner", _parse_int)
    planner_processes: int = _setting(
        0,
        "run the planner in this many worker processes instead of threads (0 = threads); "
        "avoids GIL contention with ingestion for slow pure-Python policies",
        _parse_int,
    )
    # Process
    shutdown_grace_s: float = _setting(
        5.0,
        "on SIGTERM/SIGINT, seconds in-flight calls get to finish (agent streams are ended "
        "with UNAVAILABLE at once, so agents reconnect)",
        _parse_float,
    )
    log_level: str = _setting("info", f"one of {', '.join(LOG_LEVELS)}", _parse_str)
    per_layer_metrics: bool = _setting(
        False,
        "export eplb_layer_balancedness{deployment,layer} on /metrics (L series per deployment; "
        "off by default to bound cardinality; per-expert load is at GET "
        "/v1/deployments/NAME/experts, never in metrics)",
        _parse_bool, metavar="BOOL",
    )
    # Durable state and high availability (issue 7; docs/decisions/0008-durable-state-and-ha.md)
    store: str = _setting(
        "memory",
        "where durable state lives: memory (lost with the process) or redis://HOST:PORT/DB "
        "(rediss:// for TLS); with Redis, replicas elect a leader through a lease",
        _parse_str,
        metavar="URL",
    )
    redis_prefix: str = _setting(
        "eplb", "prefix of every Redis key (several services can share one Redis)", _parse_str,
        metavar="PREFIX",
    )
    store_timeout_s: float = _setting(
        2.0, "timeout of one Redis call; a failure makes the service not ready until Redis "
        "answers again", _parse_float,
    )
    lease_s: float = _setting(
        5.0,
        "leader lease period (Redis store): the leader renews it every lease_s/3; a follower "
        "takes over within two lease periods after the leader dies",
        _parse_float,
    )
    replica_id: str = _setting(
        "", "this replica's name in the leader lease, unique per live replica (default "
        "HOSTNAME-PID); a restarted replica with the same name takes its lease back at once",
        _parse_str, metavar="NAME",
    )
    advertise_address: str = _setting(
        "", "gRPC HOST:PORT followers name when they refuse agents (default host:grpc_port)",
        _parse_str, metavar="HOST:PORT",
    )
    window_save_s: float = _setting(
        0.0, "the load window is saved to the store this often (0 = every report_interval_s); "
        "a restart loses at most this much window (tokens_total loses nothing)", _parse_float,
    )
    # Security
    token: str | None = _setting(
        None,
        "shared bearer token required for REST mutations and agent streams (environment or "
        "config file only, never a flag)",
        _parse_optional_str,
        secret=True,
    )
    token_file: str | None = _setting(
        None, "file holding the bearer token (instead of EPLB_TOKEN)", _parse_optional_str,
        metavar="FILE",
    )
    auth_reads: bool = _setting(
        False,
        "also require the token for REST reads, /metrics, /docs and GetPlacement "
        "(/healthz and /readyz stay open)",
        _parse_bool, metavar="BOOL",
    )
    tls_cert: str | None = _setting(
        None, "PEM certificate (chain) of the gRPC and HTTP servers; enables TLS on both",
        _parse_optional_str, metavar="FILE",
    )
    tls_key: str | None = _setting(
        None, "PEM private key of tls_cert", _parse_optional_str, metavar="FILE"
    )
    tls_client_ca: str | None = _setting(
        None, "PEM CA bundle: gRPC clients must present a certificate it signed (mTLS)",
        _parse_optional_str, metavar="FILE",
    )
    # Limits
    max_reports_per_s: float = _setting(
        50.0, "load reports per second one rank may send (bursts up to 2 s worth); more gets "
        "RESOURCE_EXHAUSTED", _parse_float,
    )
    max_deployments: int = _setting(
        64, "deployments one service registers; more gets FAILED_PRECONDITION", _parse_int
    )
    max_layers: int = _setting(256, "MoE layers L of one deployment at most", _parse_int)
    max_experts: int = _setting(1024, "logical experts E per layer at most", _parse_int)
    max_slots: int = _setting(
        4096, "physical slots P per layer at most (bounds ranks too: R divides P)", _parse_int
    )
    max_body_bytes: int = _setting(
        16 * 1024 * 1024, "largest REST request body; larger ones get 413", _parse_int
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                parsed = f.metadata["parse"](value)
            except ValueError as exc:
                raise ConfigError(f"{f.name}: {exc}") from None
            if parsed is not value:
                object.__setattr__(self, f.name, parsed)
        self._check()

    def _check(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        need(bool(self.host.strip()), "host", "a non-empty address")
        for port in ("grpc_port", "http_port"):
            need(0 <= getattr(self, port) <= 65535, port, "in 0..65535")
        need(self.max_message_bytes >= 1024, "max_message_bytes", ">= 1024")
        need(self.max_message_bytes <= 1 << 30, "max_message_bytes", "<= 1 GiB")
        need(self.hello_timeout_s > 0, "hello_timeout_s", "> 0")
        need(self.report_interval_s > 0, "report_interval_s", "> 0")
        need(self.agreement_period_steps >= 1, "agreement_period_steps", ">= 1")
        need(self.layers_per_step >= 0, "layers_per_step", ">= 0")
        need(self.window_s > 0, "window_s", "> 0")
        need(1 <= self.window_buckets <= 10_000, "window_buckets", "in 1..10000")
        need(self.versions_kept >= 2, "versions_kept", ">= 2")
        need(self.num_groups >= 1, "num_groups", ">= 1")
        need(
            self.expert_bytes is None or self.expert_bytes >= 0, "expert_bytes", "none or >= 0"
        )
        need(self.rebalance_interval_s >= 0, "rebalance_interval_s", ">= 0 (0 = off)")
        need(0 <= self.min_gain <= 1, "min_gain", "in 0..1")
        need(self.cooldown_s >= 0, "cooldown_s", ">= 0")
        need(self.rollout_timeout_s > 0, "rollout_timeout_s", "> 0")
        need(self.rollouts_kept >= 1, "rollouts_kept", ">= 1")
        need(1 <= self.planner_threads <= 64, "planner_threads", "in 1..64")
        need(0 <= self.planner_processes <= 64, "planner_processes", "in 0..64")
        need(self.shutdown_grace_s >= 0, "shutdown_grace_s", ">= 0")
        need(self.log_level in LOG_LEVELS, "log_level", f"one of {', '.join(LOG_LEVELS)}")
        need(
            self.store == "memory" or self.store.startswith(("redis://", "rediss://", "unix://")),
            "store", "memory or a redis://HOST:PORT/DB URL",
        )
        need(bool(self.redis_prefix) and " " not in self.redis_prefix, "redis_prefix",
             "a non-empty prefix without spaces")
        need(self.store_timeout_s > 0, "store_timeout_s", "> 0")
        need(0.1 <= self.lease_s <= 600, "lease_s", "in 0.1..600")
        need("|" not in self.replica_id, "replica_id", "a name without '|'")
        need(self.window_save_s >= 0, "window_save_s", ">= 0 (0 = report_interval_s)")
        need(self.token is None or (bool(self.token.strip()) and "\n" not in self.token),
             "token", "a non-empty single line")
        need((self.tls_cert is None) == (self.tls_key is None), "tls_key",
             "given together with tls_cert")
        need(self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca",
             "used with tls_cert and tls_key")
        need(self.max_reports_per_s > 0, "max_reports_per_s", "> 0")
        need(self.max_deployments >= 1, "max_deployments", ">= 1")
        need(self.max_layers >= 1, "max_layers", ">= 1")
        need(self.max_experts >= 1, "max_experts", ">= 1")
        need(self.max_slots >= 1, "max_slots", ">= 1")
        need(self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024")
        from eplb_service.policy import POLICIES  # numpy only; imported late to keep this light

        need(self.policy in POLICIES, "policy", f"one of {', '.join(sorted(POLICIES))}")

    def options_for(self, deployment: str) -> DeploymentOptions:
        """The deployment's override, else the service-wide ``expert_bytes``/``num_groups``."""
        override = self.deployments.get(deployment)
        if override is not None:
            return override
        return DeploymentOptions(expert_bytes=self.expert_bytes, num_groups=self.num_groups)

    def bearer_token(self) -> str | None:
        """The shared token: ``token`` (EPLB_TOKEN) or the first line of ``token_file``.

        Raises:
            ConfigError: both given, or the file is unreadable or empty (never shows the token).
        """
        if self.token_file is None:
            return None if self.token is None else self.token.strip()
        if self.token is not None:
            raise ConfigError("token_file: give either EPLB_TOKEN or token_file, not both")
        try:
            text = Path(self.token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"token_file {self.token_file!r}: cannot read it ({exc})") from None
        lines = text.strip().splitlines()
        if not lines or not lines[0].strip():
            raise ConfigError(f"token_file {self.token_file!r}: is empty")
        return lines[0].strip()

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


FIELDS: tuple[dataclasses.Field[Any], ...] = tuple(dataclasses.fields(Settings))
FIELD_NAMES = frozenset(f.name for f in FIELDS)


def env_var(name: str) -> str:
    """The environment variable of setting ``name``."""
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    """The command-line flag of setting ``name``."""
    return "--" + name.replace("_", "-")


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return "none" if f.default is None else str(f.default)
    factory: Any = f.default_factory
    return json.dumps(dict(factory()))


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a JSON (``.json``) or TOML (``.toml``, Python >= 3.11) settings file.

    Raises:
        ConfigError: unreadable file, bad syntax, not an object, or an unknown key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc.strerror or exc}") from None
    data: Any
    if p.suffix.lower() == ".toml":
        if sys.version_info < (3, 11):
            raise ConfigError(
                f"config file {str(p)!r}: TOML needs Python >= 3.11 (tomllib); use JSON"
            )
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r}: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected an object of settings")
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise ConfigError(
            f"config file {str(p)!r}: unknown setting {unknown[0]!r} "
            f"(known: {', '.join(sorted(FIELD_NAMES))})"
        )
    return data


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from defaults < config file < ``EPLB_*`` environment < ``overrides`` (CLI).

    Args:
        config_file: JSON or TOML file, or None.
        env: the environment (``os.environ`` when None); unrelated variables are ignored.
        overrides: field name -> value (text or typed); None values are ignored.

    Raises:
        ConfigError: naming the setting and where its bad value came from.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        for name, value in read_config_file(config_file).items():
            values[name], sources[name] = value, f"config file {str(config_file)!r}"
    for f in FIELDS:  # every setting, secrets included, can come from the environment
        raw = env.get(env_var(f.name))
        if raw is not None:
            values[f.name], sources[f.name] = raw, f"environment {env_var(f.name)}"
    for name, value in (overrides or {}).items():
        if name not in FIELD_NAMES:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name], sources[name] = value, f"flag {flag(name)}"
    parsed: dict[str, Any] = {}
    by_name = {f.name: f for f in FIELDS}
    for name, value in values.items():
        try:
            parsed[name] = by_name[name].metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(f"{name} (from {sources[name]}): {exc}") from None
    try:
        return Settings(**parsed)
    except ConfigError as exc:
        bad = str(exc).split(" ", 1)[0].rstrip(":")
        if bad in sources:
            raise ConfigError(f"{exc} (from {sources[bad]})") from None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config FILE`` and one flag per setting (default None: "not given")."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(ENV_PREFIX + "CONFIG"),
        help="settings file, JSON or TOML (Python >= 3.11); env EPLB_CONFIG",
    )
    for f in FIELDS:
        if not f.metadata["cli"]:
            continue
        parser.add_argument(
            flag(f.name),
            dest=f.name,
            metavar=f.metadata["metavar"] or f.name.rsplit("_", 1)[-1].upper(),
            default=None,
            help=f"{f.metadata['help']}; env {env_var(f.name)}; default {_default_text(f)}",
        )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed :func:`add_arguments` flags, the environment and ``--config``."""
    overrides = {f.name: getattr(args, f.name, None) for f in FIELDS if f.metadata["cli"]}
    return load_settings(getattr(args, "config", None), env=env, overrides=overrides)


def settings_table() -> str:
    """A Markdown table of every setting (for the README)."""
    rows = ["| setting | flag | env var | default | meaning |", "|---|---|---|---|---|"]
    for f in FIELDS:
        cli = f"`{flag(f.name)}`" if f.metadata["cli"] else "-"
        rows.append(
            f"| `{f.name}` | {cli} | `{env_var(f.name)}` | `{_default_text(f)}` "
            f"| {f.metadata['help']} |"
        )
    return "\n".join(rows)
