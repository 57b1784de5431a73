"""The bearer token (REST mutations, agent streams, optional reads; never logged) and TLS on
gRPC (with optional mTLS) and HTTP, with a throwaway CA made by ``openssl`` in a temp dir."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest

from eplb_proto.v1 import eplb_pb2, eplb_pb2_grpc

TOKEN = "s3cret-token-for-tests"


def test_token_required_for_mutations_and_streams(service_factory, raw_agent, http):
    service = service_factory(token=TOKEN, rollout_timeout_s=5)
    base = f"{service.http_url}/v1/deployments/dep"
    # Reads stay open by default; mutations need the token.
    assert http("GET", f"{service.http_url}/v1/deployments")[0] == 200
    status, body = http("POST", f"{base}/rebalance", {})
    assert status == 401 and "missing bearer token" in body["detail"]
    req = urllib.request.Request(f"{base}/rebalance", data=b"{}", method="POST",
                                 headers={"Authorization": "Bearer wrong",
                                          "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 401 and err.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"invalid bearer token" in err.value.read()
    req = urllib.request.Request(f"{base}/rebalance", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 404  # authenticated: now the real answer (no such deployment)

    agent = raw_agent(service.grpc_target)
    agent.hello(world_size=1, layers=1, experts=2, slots=2)
    code, details = agent.status()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details

    channel = grpc.insecure_channel(service.grpc_target)
    stub = eplb_pb2_grpc.EplbStub(channel)
    hello = eplb_pb2.AgentMessage(hello=eplb_pb2.Hello(
        deployment="dep", world_size=1, num_layers=1, num_experts=2, num_slots=2, num_nodes=1,
        incarnation="i"))
    call = stub.Connect(iter([hello]), metadata=(("authorization", "Bearer nope"),), timeout=5)
    with pytest.raises(grpc.RpcError) as rpc_err:
        list(call)
    assert rpc_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid bearer token" in rpc_err.value.details()
    call = stub.Connect(iter([hello]), metadata=(("authorization", f"Bearer {TOKEN}"),),
                        timeout=5)
    first = next(iter(call))
    assert first.WhichOneof("body") == "settings"
    call.cancel()
    channel.close()
    # GetPlacement is a read: open by default.
    with grpc.insecure_channel(service.grpc_target) as ch:
        reply = eplb_pb2_grpc.EplbStub(ch).GetPlacement(
            eplb_pb2.GetPlacementRequest(deployment="dep"), timeout=5)
        assert reply.deployment == "dep"
    _, metrics = http("GET", f"{service.http_url}/metrics")
    assert TOKEN not in metrics
    assert 'eplb_auth_failures_total{transport="grpc"} 2.0' in metrics
    assert 'eplb_auth_failures_total{transport="http"} 2.0' in metrics


def test_auth_reads_and_token_file(service_factory, http, tmp_path, raw_agent):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    service = service_factory(token_file=str(token_file), auth_reads=True)
    assert http("GET", f"{service.http_url}/v1/deployments")[0] == 401
    assert http("GET", f"{service.http_url}/metrics")[0] == 401
    assert http("GET", f"{service.http_url}/healthz")[0] == 200
    assert http("GET", f"{service.http_url}/readyz")[0] == 200
    req = urllib.request.Request(f"{service.http_url}/v1/deployments",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    with grpc.insecure_channel(service.grpc_target) as ch, pytest.raises(grpc.RpcError) as err:
        eplb_pb2_grpc.EplbStub(ch).GetPlacement(
            eplb_pb2.GetPlacementRequest(deployment="dep"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_never_a_flag_never_logged(serve_process, tmp_path, http):
    from tests.test_service_serve import run_cli

    result = run_cli("serve", "--token", TOKEN)
    assert result.returncode == 2 and TOKEN not in result.stderr.replace("--token " + TOKEN, "")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = run_cli("serve", "--token-file", str(empty))
    assert result.returncode == 2 and "token_file" in result.stderr and "empty" in result.stderr
    proc = serve_process("--log-level", "debug", env={"EPLB_TOKEN": TOKEN})
    assert http("POST", f"{proc.http_url}/v1/deployments/x/rebalance", {})[0] == 401
    assert http("POST", f"{proc.http_url}/v1/deployments/x/rebalance", {})[0] == 401
    proc.terminate()
    assert TOKEN not in proc.output()


# ------------------------------------------------------------------------------------------
# TLS


def make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server cert for 127.0.0.1/localhost and a client cert (openssl CLI)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl CLI is needed to make throwaway test certificates"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=eplb test CA")
    (directory / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")
    return {n: directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                                        "client.key")}


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    return make_pki(d)


def hello_message() -> eplb_pb2.AgentMessage:
    return eplb_pb2.AgentMessage(hello=eplb_pb2.Hello(
        deployment="tls", world_size=1, num_layers=1, num_experts=2, num_slots=2, num_nodes=1,
        incarnation="i"))


def test_tls_on_grpc_and_http_refuses_plaintext(service_factory, pki):
    service = service_factory(tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]))
    # Plaintext gRPC: refused (the handshake never completes).
    with grpc.insecure_channel(service.grpc_target) as ch, pytest.raises(grpc.RpcError) as err:
        eplb_pb2_grpc.EplbStub(ch).GetPlacement(
            eplb_pb2.GetPlacementRequest(deployment="tls"), timeout=3)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # TLS gRPC with the CA: works.
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"].read_bytes())
    with grpc.secure_channel(service.grpc_target, creds) as ch:
        call = eplb_pb2_grpc.EplbStub(ch).Connect(iter([hello_message()]), timeout=5)
        assert next(iter(call)).WhichOneof("body") == "settings"
        call.cancel()
    # Plain HTTP to the HTTPS port: refused; HTTPS with the CA: works.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"{service.http_url}/healthz", timeout=3).read()
    context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    https = service.http_url.replace("http://", "https://")
    with urllib.request.urlopen(f"{https}/healthz", timeout=5, context=context) as resp:
        assert resp.status == 200


def test_mtls_requires_a_client_certificate(service_factory, pki):
    service = service_factory(tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]),
                              tls_client_ca=str(pki["ca.pem"]))
    ca = pki["ca.pem"].read_bytes()
    without = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(service.grpc_target, without) as ch, pytest.raises(grpc.RpcError):
        eplb_pb2_grpc.EplbStub(ch).GetPlacement(
            eplb_pb2.GetPlacementRequest(deployment="tls"), timeout=3)
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=pki["client.key"].read_bytes(),
        certificate_chain=pki["client.pem"].read_bytes())
    with grpc.secure_channel(service.grpc_target, with_cert) as ch, pytest.raises(
        grpc.RpcError
    ) as err:
        eplb_pb2_grpc.EplbStub(ch).GetPlacement(
            eplb_pb2.GetPlacementRequest(deployment="tls"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # through TLS: a real answer


@pytest.mark.slow
def test_simulator_passes_token_file_and_tls_ca(service_factory, pki, tmp_path, http):
    from tests.test_restart import simulate, summary_of

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    service = service_factory(tls_cert=str(pki["server.pem"]), tls_key=str(pki["server.key"]),
                              token=TOKEN, report_interval_s=0.05)
    sim = simulate(service.grpc_target, "--deployment", "sec", "--ranks", "2", "--layers", "2",
                   "--experts", "4", "--slots", "4", "--top-k", "2", "--tokens-per-step", "8",
                   "--steps", "30", "--step-interval", "0.01", "--flush-timeout", "20",
                   "--token-file", str(token_file), "--tls-ca", str(pki["ca.pem"]),
                   env={"EPLB_TOKEN": ""})
    summary = summary_of(sim, timeout=60)
    assert summary["flushed"], summary
    context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    https = service.http_url.replace("http://", "https://")
    with urllib.request.urlopen(f"{https}/v1/deployments/sec", timeout=5,
                                context=context) as resp:
        import json

        assert json.loads(resp.read())["tokens_total"] == summary["tokens_sent"]
