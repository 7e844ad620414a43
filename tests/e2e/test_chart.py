"""The Helm chart with a real helm (tools/helm, built from helm.sh/helm/v3) and the real API server.

* ``helm lint --strict`` and ``helm template`` with the default, HA and namespaced values;
* every rendered manifest validated by the API server (``kubectl apply --dry-run=server``); the
  Prometheus Operator kinds get minimal CRDs here (any ``spec``), so their contents are checked
  structurally instead: the PrometheusRule's groups with ``promtool check rules``, the
  ServiceMonitor against the Service it must select;
* the operator pod template created as a Pod in a namespace enforcing ``restricted``;
* ``helm install`` for real, then the operator run as a local process *as the chart's
  ServiceAccount* (a TokenRequest token in a kubeconfig) with the Deployment's own arguments and
  environment: it reconciles a TrainingRun to Running with no RBAC error — the chart's RBAC is
  sufficient, and it grants nothing beyond the enumerated verbs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_dev.cluster import LocalControlPlane
from fermata_dev.kubelet import LocalKubelet
from fermata_operator.crdgen import render
from tests.e2e.conftest import Runs, spec, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fermata"
HELM_BUILD = ROOT / "tools" / "helm" / "build.sh"
HELM = ROOT / "tools" / "helm" / "bin" / "helm"
VALUES = {
    "default": [],
    "ha": ["-f", str(CHART / "ci" / "ha-values.yaml")],
    "namespaced": ["-f", str(CHART / "ci" / "namespaced-values.yaml")],
}

# Minimal stand-ins for the Prometheus Operator CRDs: the kinds exist, any spec is accepted.
MONITORING_CRDS = [
    {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": plural[:-1], "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }
    for kind, plural in (("ServiceMonitor", "servicemonitors"), ("PrometheusRule", "prometheusrules"))
]


@pytest.fixture(scope="session")
def helm() -> Path:
    """tools/helm/bin/helm, built on first use (a cold build takes a few minutes)."""
    if not HELM.exists() and shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
        pytest.skip("no Go toolchain to build tools/helm/bin/helm")
    subprocess.run(["bash", str(HELM_BUILD)], check=True, timeout=1800, capture_output=True)
    return HELM


def run_helm(helm: Path, *args: str, kubeconfig: Path | None = None) -> str:
    env = dict(
        os.environ, HELM_CACHE_HOME="/tmp/fermata-helm/cache", HELM_CONFIG_HOME="/tmp/fermata-helm/config"
    )
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def template(helm: Path, namespace: str, *values: str, release: str = "fermata") -> list[dict[str, Any]]:
    out = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, *values)
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------ no cluster


def test_chart_crd_is_the_generated_one() -> None:
    name = "fermata.dev_trainingruns.yaml"
    top = (ROOT / "crds" / name).read_text()
    assert (CHART / "crds" / name).read_text() == top, "run `python -m fermata_operator.crdgen`"
    assert top == render()


@pytest.mark.parametrize("values", sorted(VALUES))
def test_lint_strict(helm: Path, values: str) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), *VALUES[values])
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_schema_rejects_bad_values(helm: Path) -> None:
    for bad in ("replicaCount=-1", "priceTable.prices.g4dn\\.xlarge/spot=cheap", "nosuchkey=1"):
        proc = subprocess.run(
            [str(helm), "template", "x", str(CHART), "--set", bad], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, (
            bad
        )


def test_rendering_modes(helm: Path) -> None:
    default = template(helm, "fermata-system")
    dep = find(default, "Deployment")[0]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["fermata", "operator"]
    assert c["args"] == ["--liveness", "http://0.0.0.0:8081/healthz"]  # standalone, cluster-wide
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FERMATA_METRICS_PORT"] == "8080"
    assert env["FERMATA_PRICE_TABLE"] == "fermata-system/fermata-prices"
    # Only the nodes Fermata pods can land on are watched (Karpenter's by default).
    assert env["FERMATA_NODE_LABEL_SELECTOR"] == "karpenter.sh/capacity-type"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "liveness": 8081}
    prices = find(default, "ConfigMap", "fermata-prices")[0]["data"]
    assert prices["g4dn.xlarge_spot"] == "0.39" and prices["g4dn.xlarge_on-demand"] == "1.30"
    assert not find(default, "ServiceMonitor") and not find(default, "PrometheusRule")
    assert not find(default, "ClusterKopfPeering") and not find(default, "Role", "-runs")
    cluster_roles = {d["metadata"]["name"]: d for d in find(default, "ClusterRole")}
    assert set(cluster_roles) == {"fermata-cluster", "fermata-runs"}

    ha = template(helm, "fermata-system", *VALUES["ha"])
    c = find(ha, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][-2:] == ["--peering", "fermata"]
    assert [d["metadata"]["name"] for d in find(ha, "ClusterKopfPeering")] == ["fermata"]
    peer_rules = [r for r in find(ha, "ClusterRole", "-cluster")[0]["rules"] if "kopf.dev" in r["apiGroups"]]
    assert peer_rules == [
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"],
        }
    ]

    ns = template(helm, "fermata-system", *VALUES["namespaced"])
    c = find(ns, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][2:] == ["--peering", "fermata", "--namespace", "ml-team-a", "--namespace", "ml-team-b"]
    assert {d["metadata"]["namespace"] for d in find(ns, "Role", "-runs")} == {"ml-team-a", "ml-team-b"}
    assert {d["metadata"]["namespace"] for d in find(ns, "KopfPeering")} == {"ml-team-a", "ml-team-b"}
    # Confined mode: the only cluster-wide grants are reads of nodes, CRDs and namespaces.
    assert [d["metadata"]["name"] for d in find(ns, "ClusterRole")] == ["fermata-cluster"]
    verbs = {
        (g, r): tuple(rule["verbs"])
        for rule in find(ns, "ClusterRole")[0]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert verbs == {
        ("", "nodes"): ("get", "list", "watch"),
        ("apiextensions.k8s.io", "customresourcedefinitions"): ("list", "watch"),
        ("", "namespaces"): ("get", "list", "watch"),
    }
    # Namespaced verbs, enumerated exactly (no wildcards, no secrets, no escalate/bind).
    rules = {
        (g, r): tuple(rule["verbs"])
        for rule in find(ns, "Role", "-runs")[0]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules == {
        ("", "pods"): ("get", "list", "watch", "create", "delete", "patch"),
        ("", "serviceaccounts"): ("get", "create", "delete"),
        ("rbac.authorization.k8s.io", "roles"): ("get", "create"),
        ("rbac.authorization.k8s.io", "rolebindings"): ("get", "create", "delete"),
        ("", "events"): ("create", "patch"),
        ("fermata.dev", "trainingruns"): ("get", "list", "watch", "patch", "delete"),
        ("fermata.dev", "trainingruns/status"): ("get", "patch"),
        ("fermata.dev", "trainingbudgets"): ("get", "list", "watch"),
        ("fermata.dev", "trainingbudgets/status"): ("get", "patch"),
        ("kopf.dev", "kopfpeerings"): ("get", "list", "watch", "patch"),
    }


def test_the_notification_webhook_reaches_the_operator(helm: Path) -> None:
    def env_of(*values: str) -> dict[str, Any]:
        dep = find(template(helm, "fermata-system", *values), "Deployment")[0]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}

    assert not any(k.startswith("FERMATA_NOTIFY") for k in env_of())
    assert "FERMATA_NODE_LABEL_SELECTOR" not in env_of("--set", "operator.nodeLabelSelector=")
    plain = env_of(
        "--set",
        "notifications.webhook.url=https://hooks.example.com/x",
        "--set",
        "notifications.webhook.format=generic",
    )
    assert plain["FERMATA_NOTIFY_WEBHOOK_URL"] == "https://hooks.example.com/x"
    assert plain["FERMATA_NOTIFY_FORMAT"] == "generic"
    assert plain["FERMATA_NOTIFY_EVENTS"] == "decision,budget,idle,failure"
    secret = env_of(
        "--set",
        "notifications.webhook.secretName=slack-hook",
        "--set",
        "notifications.webhook.secretKey=webhook",
        "--set-json",
        'notifications.webhook.events=["decision","failure"]',
    )
    assert secret["FERMATA_NOTIFY_WEBHOOK_URL"] == {"secretKeyRef": {"name": "slack-hook", "key": "webhook"}}
    assert secret["FERMATA_NOTIFY_FORMAT"] == "slack"
    assert secret["FERMATA_NOTIFY_EVENTS"] == "decision,failure"
    bad = subprocess.run(
        [str(helm), "template", "x", str(CHART), "--set", "notifications.webhook.format=teams"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "values don't meet the specifications of the schema" in bad.stderr


def test_monitoring_objects_are_structurally_valid(helm: Path, tmp_path: Path) -> None:
    docs = template(helm, "fermata-system", *VALUES["ha"])
    service = find(docs, "Service", "-metrics")[0]
    monitor = find(docs, "ServiceMonitor")[0]["spec"]
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["selector"]["matchLabels"].items())
    assert monitor["namespaceSelector"]["matchNames"] == ["fermata-system"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"] and "metrics" in port_names
    assert {"targetLabel": "job", "replacement": "fermata-operator", "action": "replace"} in monitor[
        "endpoints"
    ][0]["relabelings"]
    rule = find(docs, "PrometheusRule")[0]["spec"]
    assert rule == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rule["groups"] for r in g["rules"]}
    assert {
        "FermataBudgetWarning",
        "FermataBudgetProjectedOverrun",
        "FermataRunIdle",
        "FermataRepeatedInterruptions",
        "FermataGateNoGo",
        "FermataOperatorDown",
        "FermataOperatorAbsent",
        "FermataReconcileErrors",
    } <= alerts
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus): rules checked structurally only")
    path = tmp_path / "rendered-rules.yaml"
    path.write_text(yaml.safe_dump(rule))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dashboard = json.loads(find(docs, "ConfigMap", "-dashboard")[0]["data"]["fermata.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert any("fermata_run_cost_usd" in e for e in exprs) and dashboard["uid"] == "fermata-runs"


# ----------------------------------------------------------------------------- against the cluster


@pytest.fixture(scope="module")
def chart_crds(control_plane: LocalControlPlane, crd: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The chart's crds/ (TrainingRun + kopf peering) and the minimal monitoring CRDs."""
    path = tmp_path_factory.mktemp("chart-crds") / "monitoring.yaml"
    path.write_text(yaml.safe_dump_all(MONITORING_CRDS))
    # The TrainingRun CRD is already there (the `crd` fixture; the chart's copy is the same file, see
    # test_chart_crd_is_the_generated_one): re-applying it would only re-initialise its storage.
    sources = (CHART / "crds" / "kopf.dev_kopfpeerings.yaml", path)
    for source in sources:
        control_plane.kubectl("apply", "--server-side", "-f", str(source), check=True)
    for source in sources:  # kopf's two peering CRDs, ServiceMonitor and PrometheusRule
        control_plane.wait_established(source)


@pytest.fixture
def release_namespace(k8s_api: Any) -> Iterator[str]:
    name = f"fermata-system-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s_api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.mark.cluster
@pytest.mark.parametrize("values", sorted(VALUES))
def test_rendered_manifests_pass_server_side_dry_run(
    helm: Path,
    control_plane: LocalControlPlane,
    chart_crds: None,
    restricted_namespace: str,
    release_namespace: str,
    values: str,
    tmp_path: Path,
) -> None:
    extra = ["--set", f"watchNamespaces={{{restricted_namespace}}}"] if values == "namespaced" else []
    release = f"dry-{uuid.uuid4().hex[:6]}"
    docs = template(helm, release_namespace, *VALUES[values], *extra, release=release)
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = control_plane.kubectl("apply", "--dry-run=server", "-f", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(docs), proc.stdout
    # The operator's pod passes `restricted` where it is enforced (a Deployment would only warn).
    pod_template = find(docs, "Deployment")[0]["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "operator-pod"},
        "spec": pod_template["spec"],
    }
    pod["spec"] = {**pod["spec"], "serviceAccountName": "default"}
    pod_path = tmp_path / "pod.yaml"
    pod_path.write_text(yaml.safe_dump(pod))
    proc = control_plane.kubectl("apply", "--dry-run=server", "-n", restricted_namespace, "-f", str(pod_path))
    assert proc.returncode == 0 and "violates PodSecurity" not in proc.stderr, proc.stdout + proc.stderr


def _sa_kubeconfig(admin: Path, token: str, path: Path) -> Path:
    cfg = yaml.safe_load(admin.read_text())
    user = "fermata-operator-sa"
    cfg["users"] = [{"name": user, "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = user
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


@pytest.mark.cluster
def test_install_and_run_the_operator_as_the_chart_service_account(
    helm: Path,
    control_plane: LocalControlPlane,
    kubeconfig: Path,
    k8s_api: Any,
    chart_crds: None,
    runs: Runs,
    kubelet: LocalKubelet,
    release_namespace: str,
    tmp_path: Path,
) -> None:
    release = f"fermata-{uuid.uuid4().hex[:6]}"
    run_helm(
        helm,
        "install",
        release,
        str(CHART),
        "--namespace",
        release_namespace,
        *VALUES["namespaced"],
        "--set",
        f"watchNamespaces={{{runs.ns}}}",
        "--set",
        "operator.resyncSeconds=2",
        "--set-string",
        "priceTable.prices.g4dn\\.xlarge/spot=0.123",
        kubeconfig=kubeconfig,
    )
    proc: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "operator.log"
    try:
        status = run_helm(helm, "status", release, "-n", release_namespace, kubeconfig=kubeconfig)
        assert "STATUS: deployed" in status and f"watches TrainingRuns in: {runs.ns}" in status
        apps = client.AppsV1Api(k8s_api)
        dep = apps.read_namespaced_deployment(release, release_namespace)
        container = dep.spec.template.spec.containers[0]
        sa_name = dep.spec.template.spec.service_account_name
        assert container.command == ["fermata", "operator"]

        token = runs.core.create_namespaced_service_account_token(
            sa_name, release_namespace, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        sa_config = _sa_kubeconfig(kubeconfig, token, tmp_path / "operator-sa.kubeconfig")

        # The Deployment's own arguments and environment; only the ports move to free ones (several
        # test sessions may share this machine) and POD_ID, a fieldRef, gets a value.
        metrics_port, liveness_port = free_port(), free_port()
        args = [a.replace("0.0.0.0:8081", f"127.0.0.1:{liveness_port}") for a in container.args]
        env = {e.name: e.value for e in container.env if e.value is not None}
        assert env["FERMATA_METRICS_PORT"] == "8080"
        env["FERMATA_METRICS_PORT"] = str(metrics_port)
        env["POD_ID"] = f"{release}-local"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FERMATA_") and k != "KUBECONFIG"}
        full_env.update(env, KUBECONFIG=str(sa_config))
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fermata_operator", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        wait_for(lambda: "operator started" in log_path.read_text(), timeout=60, what="operator started")

        runs.create("charted", spec(resources={"gpus": 1}))
        wait_for(lambda: runs.status("charted").get("phase") == "Running", timeout=90, what="Running")
        # Priced from the chart's ConfigMap (0.123 set at install; the built-in table says 0.39).
        wait_for(
            lambda: (runs.status("charted").get("cost") or {}).get("hourlyRateUSD") == 0.123,
            timeout=30,
            what="cost priced from the chart's table",
        )
        pods = runs.pods("charted")
        assert [p.metadata.name for p in pods] == ["charted-0"]
        # The trainer's RBAC objects were created by the operator, through the chart's grants.
        rbac = client.RbacAuthorizationV1Api(k8s_api)
        role = rbac.read_namespaced_role("fermata-trainer", runs.ns)
        assert [(r.resources, r.verbs) for r in role.rules] == [(["trainingruns/status"], ["patch"])]

        with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert f'fermata_run_phase{{namespace="{runs.ns}",phase="Running",run="charted"}} 1.0' in metrics

        runs.delete("charted")
        wait_for(lambda: not runs.exists("charted"), timeout=60, what="run deleted by the operator")
        text = log_path.read_text()
        # Prices came from the chart's ConfigMap (readable through the -prices Role).
        assert "price table not found" not in text
        for needle in ("Forbidden", "forbidden", '"status": 403', "Not enough permissions"):
            assert needle not in text, f"{needle!r} in the operator log:\n{text[-4000:]}"
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        custom = client.CustomObjectsApi(k8s_api)
        for obj in custom.list_namespaced_custom_object("fermata.dev", "v1alpha1", runs.ns, "trainingruns")[
            "items"
        ]:  # nothing may be left for the stopped operator to finalize
            with contextlib.suppress(ApiException):
                custom.patch_namespaced_custom_object(
                    "fermata.dev",
                    "v1alpha1",
                    runs.ns,
                    "trainingruns",
                    obj["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )
        run_helm(helm, "uninstall", release, "-n", release_namespace, kubeconfig=kubeconfig)
