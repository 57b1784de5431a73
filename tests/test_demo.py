"""``eplb demo``: the live loop in a subprocess — JSON result, correctness, clean exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
MAIN = "import sys; from eplb_service.cli import main; sys.exit(main())"
KEYS = ("balancedness_before", "balancedness_after", "rebalances", "max_output_rel_error",
        "versions_consistent", "longest_pause_ms", "bytes_moved")


def demo(tag: str, *flags: str, **popen: object) -> subprocess.Popen[str]:
    """``eplb demo`` with ``EPLB_DEMO_TEST_TAG=tag`` in its environment (inherited by every
    process it starts, so strays can be found)."""
    env = {**os.environ, "EPLB_DEMO_TEST_TAG": tag, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", MAIN, "demo", *flags], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen,  # type: ignore[call-overload]
    )


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag``."""
    needle = f"EPLB_DEMO_TEST_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def assert_no_strays(tag: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


def port_closed(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((parts.hostname or "127.0.0.1", parts.port or 80)) != 0


@pytest.mark.slow
def test_demo_json_balances_exactly_and_exits_clean() -> None:
    tag = uuid.uuid4().hex
    proc = demo(tag, "--json", "--steps", "140", "--step-ms", "60", "--drift-at", "0",
                "--rebalance-interval-s", "1.5")
    try:
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert key in result, key
    assert result["rebalances"] >= 1, stderr[-3000:]
    assert result["balancedness_after"] > result["balancedness_before"], result
    assert result["versions_consistent"] is True
    assert result["max_output_rel_error"] <= 1e-5
    assert result["outputs_checked"] == result["steps"] == 140
    assert result["bytes_moved"] > 0 and result["longest_pause_ms"] > 0
    assert result["bytes_moved"] == result["service"]["bytes_moved"]
    # every slot the service changed was written on some rank, and nothing else
    assert result["slots_written"] == result["experts_moved"] > 0, result
    assert "step" in stderr and "summary" in stderr  # live progress and summary on stderr
    assert_no_strays(tag)
    assert port_closed(result["rest_url"])


@pytest.mark.slow
def test_demo_ctrl_c_stops_the_service_and_every_rank() -> None:
    tag = uuid.uuid4().hex
    # Its own process group, like a terminal's foreground job: Ctrl-C reaches all of it.
    proc = demo(tag, "--steps", "5000", "--step-ms", "20", start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the engine runs
            if " step " in line:
                break
        else:
            pytest.fail(f"the demo ended early: {proc.wait(5)}")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 130
    assert_no_strays(tag)


def test_demo_rejects_bad_flags() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, "demo", "--ranks", "3", "--experts", "16",
         "--redundant", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert "multiple of --ranks" in proc.stderr and "Traceback" not in proc.stderr
