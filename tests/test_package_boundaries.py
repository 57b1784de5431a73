"""Package boundaries from DESIGN.md, checked in fresh interpreters.

- ``worker_agent`` runs inside engine processes: it imports with torch, numpy, grpcio and
  protobuf only — never the web stack, Redis or the service package.
- The service side never needs torch at import time (the service image has none).
"""

from __future__ import annotations

import json
import subprocess
import sys

AGENT_MODULES = (
    "worker_agent",
    "worker_agent.agent",
    "worker_agent.agreement",
    "worker_agent.client",
    "worker_agent.migration",
    "worker_agent.recording",
    "worker_agent.transfers",
)
FORBIDDEN_IN_AGENT = ("eplb_service", "fastapi", "starlette", "uvicorn", "redis", "pydantic")

SERVICE_MODULES = (
    "eplb_service.app",
    "eplb_service.cli",
    "eplb_service.cli.plan",
    "eplb_service.cli.serve",
    "eplb_service.policy",
    "eplb_service.redis_store",
)


def _loaded_after_import(modules: tuple[str, ...]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_agent_imports_only_what_an_engine_has() -> None:
    loaded = _loaded_after_import(AGENT_MODULES)
    assert {"torch", "grpc", "google"} <= loaded
    leaked = sorted(set(FORBIDDEN_IN_AGENT) & loaded)
    assert not leaked, f"worker_agent pulled in {leaked}"


def test_service_imports_without_torch() -> None:
    loaded = _loaded_after_import(SERVICE_MODULES)
    assert "fastapi" in loaded
    assert "torch" not in loaded, "the service side imported torch"
