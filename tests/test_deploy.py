"""The deployment files agree with sigproxy: their configs load, drain times leave room
for grace_period, and the image runs as non-root with its health check on /healthz.
(Schema and lint checks of the same files run in .ci/run with hadolint,
kubernetes-validate, check-jsonschema and systemd-analyze.)"""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sigproxy.config import parse_config
from sigproxy.errors import ConfigError

from .support import FakeFunctionUrl, raw_request, verify_sigv4
from .test_process import creds_env, serve_process

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def k8s_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_kubernetes_configmap_loads_and_drain_fits(name: str) -> None:
    docs = k8s_docs(name)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    proxies = [
        c for c in pod.get("initContainers", []) + pod["containers"] if "sigproxy" in c["image"]
    ]
    (proxy,) = proxies
    # Every ${VAR} the config reads is one the container's env provides.
    environ = {e["name"]: "t" * 32 for e in proxy.get("env", [])}
    config = parse_config(configmap["data"]["sigproxy.yaml"], environ=environ)
    assert config.admin is not None
    assert config.admin.host == "0.0.0.0"  # the kubelet probes the pod IP
    assert pod["terminationGracePeriodSeconds"] > config.grace_period
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["resources"]["requests"]
    if name == "sidecar.yaml":
        assert proxy["restartPolicy"] == "Always"  # a native sidecar
        assert config.listen.host == "127.0.0.1"
    else:
        assert config.inbound_auth is not None
        assert config.inbound_auth.tokens == ("t" * 32,)
        env = {e["name"]: e["valueFrom"] for e in proxy["env"]}
        assert env["SIGPROXY_TOKEN"]["secretKeyRef"]["name"] == "sigproxy-inbound"
        assert env["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        # Callers use the Service's names: each is an allowed Host (DNS rebinding guard).
        (service,) = [d for d in docs if d["kind"] == "Service"]
        short = service["metadata"]["name"]
        assert {short, f"{short}.{'t' * 32}.svc.cluster.local"} <= set(config.allowed_hosts)
        # The admin port is not open to every source.
        (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), rule
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )


def test_shared_has_service_and_autoscaler() -> None:
    kinds = {d["kind"] for d in k8s_docs("shared.yaml")}
    assert {"Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_compose_config_loads() -> None:
    config = parse_config((DEPLOY / "compose" / "sigproxy.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    service = compose["services"]["sigproxy"]
    assert any(v.endswith(":/aws:ro") for v in service["volumes"])
    assert any(v.endswith("sigproxy.yaml:ro") for v in service["volumes"])
    assert service["read_only"] is True
    # ~/.aws is 0600 and the user's: the container runs as the user, not the image's 10001.
    assert service["user"].startswith("${SIGPROXY_USER:-")
    assert int(service["stop_grace_period"].rstrip("s")) > config.grace_period
    # The app calls the proxy by its service name: that Host must be allowed.
    app_command = " ".join(compose["services"]["app"]["command"])
    assert "http://sigproxy:8080/" in app_command
    assert "sigproxy" in config.allowed_hosts


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd" / "sigproxy.service").read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert int(service["WatchdogSec"]) > 0
    assert int(service["TimeoutStopSec"]) > 30  # the default grace_period
    assert service["DynamicUser"] == "yes"
    for option in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "RestrictAddressFamilies"):
        assert option in service
    assert service["CapabilityBoundingSet"] == ""
    # The install the header documents: a venv of its own (no PyPI package, no system pip).
    assert service["ExecStart"].startswith("/opt/sigproxy/bin/sigproxy serve ")
    header = (DEPLOY / "systemd" / "sigproxy.service").read_text().split("[Unit]")[0]
    assert "python3 -m venv /opt/sigproxy" in header
    # DynamicUser cannot read root's 0600 credentials: systemd hands them over.
    assert service["LoadCredential"] == "aws-credentials:/etc/sigproxy/aws/credentials"


def test_dockerfile() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1:9090/healthz", text, re.M)
    assert re.search(r'^ENTRYPOINT \["sigproxy"\]', text, re.M)  # exec form: gets SIGTERM


def test_the_image_default_config_needs_a_url_and_a_token() -> None:
    """The image serves deploy/docker/sigproxy.yaml unless a config is mounted over it:
    reachable from outside the container (so a token is required), its admin port the
    one the HEALTHCHECK probes, and without its variables one line saying which to set."""
    text = (DEPLOY / "docker" / "sigproxy.yaml").read_text()
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "COPY deploy/docker/sigproxy.yaml /etc/sigproxy/sigproxy.yaml" in dockerfile
    assert 'CMD ["serve", "--config", "/etc/sigproxy/sigproxy.yaml"]' in dockerfile
    environ = {
        "SIGPROXY_URL": "https://abc123example.lambda-url.eu-west-1.on.aws",
        "SIGPROXY_TOKEN": "t" * 32,
    }
    config = parse_config(text, environ=environ)
    assert config.listen.host == "0.0.0.0"
    assert config.inbound_auth is not None and config.inbound_auth.tokens == ("t" * 32,)
    assert config.admin is not None and config.admin.port == 9090
    assert "127.0.0.1:9090/healthz" in dockerfile
    assert config.upstreams[0].region == "eu-west-1"
    assert "sigproxy" in config.allowed_hosts
    for missing in ("SIGPROXY_URL", "SIGPROXY_TOKEN"):
        with pytest.raises(ConfigError, match=f"environment variable {missing} is not set"):
            parse_config(text, environ={k: v for k, v in environ.items() if k != missing})


async def test_the_image_default_config_serves_as_the_run_line_says(
    upstream: FakeFunctionUrl,
) -> None:
    """What `docker run ... -e SIGPROXY_URL -e SIGPROXY_TOKEN -e AWS_...` starts, run as the
    real process (no Docker engine here): the token is required, the request is signed."""
    env = dict(
        creds_env(),
        SIGPROXY_URL=f"http://127.0.0.1:{upstream.port}",
        SIGPROXY_REGION="us-east-1",
        SIGPROXY_TOKEN="container-token-never-LOGGED-01",
    )
    path = str(DEPLOY / "docker" / "sigproxy.yaml")
    async with serve_process(path, "--admin-port", "0", env=env) as served:
        refused = await raw_request(served.port, "GET", "/orders/1")
        assert refused.status == 401
        ok = await raw_request(
            served.port,
            "GET",
            "/orders/1",
            [("Authorization", "Bearer container-token-never-LOGGED-01")],
        )
        assert ok.status == 200
        verify_sigv4(upstream.last, region="us-east-1")
        assert await served.stop() == 0
