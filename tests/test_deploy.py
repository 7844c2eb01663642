"""The deployment artefacts under deploy/, checked by the real tools.

promtool checks and unit-tests the alerts; `kubectl kustomize` renders the base and
every overlay offline and kubernetes-validate checks each rendered object against the
Kubernetes schemas (the Prometheus-operator and cert-manager kinds, which it has no
schema for, are checked structurally here); the calling service's example is checked
against the proxy's issuer; hadolint lints the Dockerfile; and the ports, paths and
names that the image, the manifests, the alerts and SPEC share are checked to agree.

A missing tool fails the test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .certificates import issue, make_ca
from .manifests import DEPLOY, KUSTOMIZE, ROOT, find_tool, one, render, rendered_config, run

ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
OPERATIONS_DOC = ROOT / "README.md"  # its Alerts section holds the runbooks

# SPEC: the API and admin listeners, and where the image expects its configuration.
API_PORT = 8080
ADMIN_PORT = 9090
CONFIG_PATH = "/etc/invoice-proxy/config.toml"
JOB = "invoice-proxy"
VAULT_AGENT_FILE = "/vault/secrets/planetscale.json"

# The oldest Kubernetes the manifests support (PDB unhealthyPodEvictionPolicy is GA
# in 1.31) and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
# Kinds kubernetes-validate has no schema for: checked by check_custom_resource below.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
}

# The proxy's base and overlays; beside them, examples of other services (callers).
_ALL_KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(KUSTOMIZE)) for p in KUSTOMIZE.rglob("kustomization.yaml")
)
EXAMPLES = [k for k in _ALL_KUSTOMIZATIONS if k.startswith("examples/")]
KUSTOMIZATIONS = [k for k in _ALL_KUSTOMIZATIONS if k not in EXAMPLES]
CALLING_SERVICE = "examples/calling-service"
TLS_OVERLAY = "overlays/tls"


def load_alerts() -> dict[str, Any]:
    return yaml.safe_load(ALERTS.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_alerts()["groups"] for r in g["rules"] if "alert" in r]


# --- Prometheus alerts ---------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = run([find_tool("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = run([find_tool("promtool"), "test", "rules", str(ALERTS_TEST)], cwd=ALERTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_the_operations_issue_asks_for_exist() -> None:
    names = {r["alert"] for r in alert_rules()}
    wanted = {
        "InvoiceProxyNoCredential",  # no credential loaded
        "InvoiceProxyCredentialReloadFailing",  # reloads failing for 10 minutes
        "InvoiceProxyUpstreamCredentialRejected",  # PlanetScale refusing the token
        "InvoiceProxyUpstreamErrorRatioHigh",
        "InvoiceProxyUpstreamLatencyHigh",
        "InvoiceProxyUpstreamRateLimited",  # 429s from PlanetScale
        "InvoiceProxyCacheHitRatioCollapse",
        "InvoiceProxyReplicaDown",  # up == 0
        "InvoiceProxyNoReplicaUp",  # every target down, or absent
    }
    assert wanted <= names, f"missing alerts: {sorted(wanted - names)}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_carries_severity_and_runbook_annotations(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert "for" in rule, "an alert without `for` pages on a single bad evaluation"
    for key in ("summary", "description", "runbook"):
        assert rule["annotations"].get(key, "").strip(), f"annotation {key} is empty"
    anchor = rule["alert"].lower()
    assert f"README.md#{anchor}" in rule["annotations"]["runbook"]
    assert f'job="{JOB}"' in rule["expr"], "every expression selects the proxy's job"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_unit_tests_that_fire_it_and_keep_it_quiet(rule: dict[str, Any]) -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == rule["alert"]
    ]
    assert any(case.get("exp_alerts") for case in cases), "no case where it fires"
    assert any(not case.get("exp_alerts") for case in cases), "no case where it stays quiet"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_runbook_section_exists_in_operations_doc(rule: dict[str, Any]) -> None:
    assert OPERATIONS_DOC.is_file(), f"{OPERATIONS_DOC} is missing"
    # The heading is the alert's name alone, so its anchor is the runbook link's.
    headings = re.findall(r"^#+\s+(.+?)\s*$", OPERATIONS_DOC.read_text(), flags=re.MULTILINE)
    assert rule["alert"] in headings, f"README.md has no heading {rule['alert']}"


def test_prometheusrule_is_generated_from_the_alerts_file() -> None:
    result = run(
        [sys.executable, str(KUSTOMIZE / "generate_prometheusrule.py"), "--check"], cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes manifests ------------------------------------------------------------


def proxy_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "invoice-proxy")


def named_port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_kustomize_finds_the_base_the_overlays_and_the_example() -> None:
    assert {
        "base", "overlays/vault-agent", "overlays/vault-direct", "overlays/redis", TLS_OVERLAY
    } <= set(KUSTOMIZATIONS)  # fmt: skip
    assert EXAMPLES == [CALLING_SERVICE]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid(kustomization: str) -> None:
    objects = render(kustomization)
    kinds = {o["kind"] for o in objects}
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            check_custom_resource(obj, objects)
            continue
        validate(obj)


def validate(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {path}: {exc}")


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The check above bites: strict validation refuses an unknown field."""
    deployment = dict(one(render("base"), "Deployment"))
    deployment["spec"] = dict(deployment["spec"], replica=2)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


_DURATION = re.compile(r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
# cert-manager.io/v1 Certificate: the spec fields this repository may use, and the values
# its enums allow (https://cert-manager.io/docs/reference/api-docs/#cert-manager.io/v1).
_CERTIFICATE_FIELDS = {
    "secretName", "duration", "renewBefore", "dnsNames", "ipAddresses", "uris", "usages",
    "privateKey", "issuerRef", "commonName", "subject", "secretTemplate",
}  # fmt: skip
_KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment",
    "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
    "decipher only", "any", "server auth", "client auth", "code signing", "email protection",
    "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}  # fmt: skip
_PRIVATE_KEYS = {"RSA": {2048, 3072, 4096}, "ECDSA": {256, 384, 521}, "Ed25519": {None}}


def check_custom_resource(obj: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """Structural checks for the Prometheus-operator kinds (no schema offline)."""
    assert obj["metadata"]["name"], "metadata.name is required"
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, spec
        service = one(objects, "Service")
        assert obj["metadata"].get("namespace") == service["metadata"].get("namespace")
        wanted = spec["selector"]["matchLabels"].items()
        assert wanted <= service["metadata"]["labels"].items(), "selector misses the Service"
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["port"] in port_names
            assert endpoint.get("path", "/metrics") == "/metrics"
            for key in ("interval", "scrapeTimeout"):
                assert _DURATION.match(endpoint.get(key, "0")), f"{key}: bad duration"
    elif obj["kind"] == "Certificate":
        check_certificate(obj, objects)
    else:
        assert set(spec) == {"groups"}
        assert spec["groups"] == load_alerts()["groups"], "PrometheusRule differs from alerts.yaml"


def check_certificate(obj: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """cert-manager's Certificate for the listener: well formed, and the one the
    Deployment mounts where `server.tls` reads it, for the Service's DNS names."""
    spec = obj["spec"]
    assert set(spec) <= _CERTIFICATE_FIELDS, set(spec) - _CERTIFICATE_FIELDS
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"} and spec["issuerRef"]["name"]
    assert spec["issuerRef"].get("kind", "Issuer") in {"Issuer", "ClusterIssuer"}
    assert set(spec.get("usages", [])) <= _KEY_USAGES, spec["usages"]
    assert "server auth" in spec["usages"]
    key = spec["privateKey"]
    assert set(key) <= {"algorithm", "size", "rotationPolicy", "encoding"}
    assert key.get("size") in _PRIVATE_KEYS[key["algorithm"]]
    assert key.get("rotationPolicy") == "Always", "a renewal brings a new key"
    for name in ("duration", "renewBefore"):
        assert _DURATION.match(spec.get(name, "0")), f"{name}: bad duration"
    namespace = obj["metadata"]["namespace"]
    service = one(objects, "Service")
    assert service["metadata"]["namespace"] == namespace
    assert f"{service['metadata']['name']}.{namespace}.svc" in spec["dnsNames"]
    # The Secret it writes is the volume that server.tls.cert_file and key_file are in.
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(
        v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == spec["secretName"]
    )
    mount = next(m for m in proxy_container(objects)["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount, "a subPath mount is not updated when the Secret changes"
    assert volume["secret"].get("defaultMode", 0o644) & 0o007 == 0, "the key is not world-readable"
    tls = rendered_config(objects)["server"]["tls"]
    assert tls["cert_file"] == f"{mount['mountPath']}/tls.crt"
    assert tls["key_file"] == f"{mount['mountPath']}/tls.key"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_prometheusrule_passes_promtool(kustomization: str, tmp_path: Path) -> None:
    rule = one(render(kustomization), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = run([find_tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_deployment_is_hardened_and_probed(kustomization: str) -> None:
    objects = render(kustomization)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = proxy_container(objects)
    autoscalers = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    if autoscalers:  # the autoscaler owns the count; an apply must not reset it
        assert "replicas" not in deployment["spec"]
        assert autoscalers[0]["spec"]["minReplicas"] >= 2
    else:
        assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), f"resources.{kind}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "admin"
    assert not container["image"].endswith(":latest") and ":" in container["image"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ports_and_paths_agree_with_spec_and_the_config(kustomization: str) -> None:
    objects = render(kustomization)
    config = rendered_config(objects)
    container = proxy_container(objects)
    assert config["server"]["port"] == named_port(container, "http") == API_PORT
    assert config["server"]["admin_port"] == named_port(container, "admin") == ADMIN_PORT
    assert container["args"] == ["--config", CONFIG_PATH]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert f"{mount['mountPath']}/config.toml" == CONFIG_PATH
    volume = next(
        v
        for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "config"
    )
    assert volume["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]

    service = one(objects, "Service")
    assert service["metadata"]["name"] == JOB, "the ServiceMonitor's job label is this name"
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["http"]["port"] == API_PORT and by_name["http"]["targetPort"] == "http"
    assert by_name["admin"]["port"] == ADMIN_PORT and by_name["admin"]["targetPort"] == "admin"
    assert one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "admin"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_network_policy_lets_in_callers_and_scraper_and_out_dns_vault_https(
    kustomization: str,
) -> None:
    objects = render(kustomization)
    policy = one(objects, "NetworkPolicy")["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress = sorted(
        (p["port"], p["protocol"]) for rule in policy["ingress"] for p in rule["ports"]
    )
    assert ingress == [(API_PORT, "TCP"), (ADMIN_PORT, "TCP")]
    scraper = next(r for r in policy["ingress"] if r["ports"][0]["port"] == ADMIN_PORT)
    assert scraper["from"] and all(f.get("podSelector") for f in scraper["from"]), (
        "the admin port is open to the scraper only"
    )
    egress = sorted((p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"])
    config = rendered_config(objects)
    shared = config.get("shared", {})
    redis = [(6379, "TCP")] if shared else []
    if shared.get("sentinels"):
        redis.append((26379, "TCP"))  # the sentinels, which name the primary
    api_server = [(6443, "TCP")] if "issuers" in config else []  # the cluster issuer's JWKS
    assert egress == sorted(
        [(53, "TCP"), (53, "UDP"), (443, "TCP"), (8200, "TCP"), *redis, *api_server]
    )


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_memory_limit_leaves_room_above_the_cache(kustomization: str) -> None:
    objects = render(kustomization)
    limit = _bytes(proxy_container(objects)["resources"]["limits"]["memory"])
    max_bytes = rendered_config(objects).get("cache", {}).get("max_bytes", 268435456)
    assert limit >= max_bytes + 128 * 2**20, "cache.max_bytes plus 128 MiB for the rest"


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_config_passes_check_config(kustomization: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = one(render(kustomization), "ConfigMap")["data"]["config.toml"]
    tls = tomllib.loads(text)["server"].get("tls")
    if tls is not None:  # check-config reads the pair: here, files as the Secret's mount has
        ca = make_ca("deploy-ca")
        cert, key, _ = issue(ca, "invoice-proxy")
        for name, data in (("cert_file", cert), ("key_file", key)):
            (tmp_path / name).write_bytes(data)
            text = text.replace(f'"{tls[name]}"', f'"{tmp_path / name}"')
    path.write_text(text)
    result = run([sys.executable, "-m", "proxy", "check-config", "--config", str(path)], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_vault_direct_overlay_reads_vault_with_kubernetes_auth() -> None:
    objects = render("overlays/vault-direct")
    credential = rendered_config(objects)["credential"]
    assert credential["source"] == "vault"
    assert credential["vault"]["auth"] == "kubernetes"
    assert credential["vault"]["role"]
    assert credential["vault"]["address"].startswith("https://")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True, "the login needs the SA token"


def test_vault_direct_config_differs_from_the_base_only_in_credential() -> None:
    base = tomllib.loads((KUSTOMIZE / "base" / "config.toml").read_text())
    direct = tomllib.loads((KUSTOMIZE / "overlays" / "vault-direct" / "config.toml").read_text())
    base.pop("credential")
    direct.pop("credential")
    assert direct == base


def test_tls_overlay_serves_https_and_trusts_the_cluster_issuer() -> None:
    objects = render(TLS_OVERLAY)
    config = rendered_config(objects)
    assert config["server"]["tls"].get("admin", False) is False, "probes and scrapes: HTTP"
    (issuer,) = config["issuers"]
    assert issuer["audiences"] == ["invoice-proxy"]
    # The JWKS is fetched with the pod's own service-account token and the cluster CA.
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    account = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert (issuer["ca_file"], issuer["token_file"]) == (f"{account}/ca.crt", f"{account}/token")
    assert issuer["jwks_url"].startswith("https://kubernetes.default.svc/")


def test_tls_config_differs_from_vault_direct_only_in_tls_issuers_and_callers() -> None:
    direct = tomllib.loads((KUSTOMIZE / "overlays" / "vault-direct" / "config.toml").read_text())
    tls = tomllib.loads((KUSTOMIZE / TLS_OVERLAY / "config.toml").read_text())
    assert "tls" in tls["server"] and tls["issuers"]
    del tls["server"]["tls"], tls["issuers"]
    by_name = {c["name"]: c for c in direct.pop("callers")}
    for caller in tls.pop("callers"):
        identity = ("key_sha256", "jwt_subjects", "certificate_uris")
        kept = {k: v for k, v in caller.items() if k not in identity}
        assert kept == {k: v for k, v in by_name[caller["name"]].items() if k not in identity}
    assert tls == direct


def test_the_calling_service_example_mounts_a_token_the_proxy_accepts() -> None:
    objects = render(CALLING_SERVICE)
    for obj in objects:
        validate(obj)
    account = one(objects, "ServiceAccount")
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False, "no API token beside the proxy's"
    (source,) = [
        s["serviceAccountToken"]
        for v in pod["volumes"]
        for s in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in s
    ]
    assert 600 <= source["expirationSeconds"] <= 3600, "short-lived (600 s is the minimum)"
    proxy = rendered_config(render(TLS_OVERLAY))
    assert source["audience"] in proxy["issuers"][0]["audiences"]
    subject = (
        f"system:serviceaccount:{account['metadata']['namespace']}:{account['metadata']['name']}"
    )
    assert any(subject in c.get("jwt_subjects", []) for c in proxy["callers"])
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    token_volume = next(v["name"] for v in pod["volumes"] if "projected" in v)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == token_volume)
    assert env["INVOICE_PROXY_TOKEN_FILE"] == f"{mount['mountPath']}/{source['path']}"
    assert env["INVOICE_PROXY_URL"].startswith("https://invoice-proxy.invoice-proxy.svc:")


def test_vault_agent_overlay_renders_the_file_the_proxy_reads() -> None:
    objects = render("overlays/vault-agent")
    credential = rendered_config(objects)["credential"]
    assert credential["source"] == "file"
    assert credential["file"]["path"] == VAULT_AGENT_FILE
    template = one(objects, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    name = Path(VAULT_AGENT_FILE).name
    assert annotations["vault.hashicorp.com/agent-inject"] == "true"
    assert annotations["vault.hashicorp.com/role"]
    secret_path = annotations[f"vault.hashicorp.com/agent-inject-secret-{name}"]
    body = annotations[f"vault.hashicorp.com/agent-inject-template-{name}"]
    assert f'with secret "{secret_path}"' in body
    assert '"token_id": {{ .Data.data.token_id | toJSON }}' in body
    assert '"token": {{ .Data.data.token | toJSON }}' in body
    # The agent runs as the proxy's user, so a 0400 file is readable by the proxy only.
    assert annotations["vault.hashicorp.com/agent-run-as-same-user"] == "true"
    assert annotations[f"vault.hashicorp.com/agent-inject-perms-{name}"] == "0400"
    assert template["spec"]["containers"][0]["name"] == "invoice-proxy"
    assert template["spec"]["containers"][0]["securityContext"]["runAsUser"] > 0
    assert template["spec"]["automountServiceAccountToken"] is True


# --- Dockerfile ----------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    args = [find_tool("hadolint"), "--no-color", "--failure-threshold", "style"]
    config = DEPLOY / ".hadolint.yaml"
    if config.exists():
        args += ["--config", str(config)]
    result = run([*args, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_builds_a_slim_non_root_image_that_serves() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and the final image"
    final = stages[-1]
    assert final[0][1].startswith("python:3.11-slim"), final[0]
    assert not any(i == "HEALTHCHECK" for stage in stages for i, _ in stage)
    assert ("ENTRYPOINT", '["invoice-proxy", "serve"]') in final
    user = [args for i, args in final if i == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) > 0
    run_lines = " ".join(args for i, args in final if i == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install"):
        assert tool not in run_lines, f"{tool} in the final image"
    assert any(i == "RUN" and "pip wheel" in args for i, args in stages[0])


def test_dockerfile_agrees_with_spec_and_the_manifests() -> None:
    final = dockerfile_stages()[-1]
    env = " ".join(args for i, args in final if i == "ENV")
    assert f"INVOICE_PROXY_CONFIG={CONFIG_PATH}" in env
    exposed = {int(p) for i, args in final if i == "EXPOSE" for p in args.split()}
    assert exposed == {API_PORT, ADMIN_PORT}
    uid = int([args for i, args in final if i == "USER"][-1].split(":")[0])
    container = proxy_container(render("base"))
    assert container["securityContext"]["runAsUser"] == uid
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["invoice-proxy"] == "proxy.__main__:main"


def test_dockerfile_copies_only_what_exists_and_the_context_keeps() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for stage in dockerfile_stages():
        for instruction, args in stage:
            if instruction != "COPY" or args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert f"!{source.rstrip('/')}" in {i.rstrip("/") for i in ignore}, (
                    f"COPY {source}: excluded by Dockerfile.dockerignore"
                )
