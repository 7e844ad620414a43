"""The chart's ValidatingAdmissionPolicies against the real API server ("Tenant-safe").

One ``helm install`` (cluster-wide, default values plus a few tenancy entries) serves the module;
every attack below is refused *by the API server*, with its readable message:

* the status guard: the trainer's ServiceAccount (a TokenRequest token) may write
  ``status.progress`` and ``status.lastCheckpoint`` and nothing else; the operator's may write
  everything;
* the operator's own identity (its ServiceAccount's token, server-side dry runs): only the
  objects of a TrainingRun, trainer pods at the ``restricted`` level, the trainer's Role and
  RoleBinding; never system namespaces; no Secrets at all (RBAC);
* no confused deputy: ``alice`` (impersonated), who may create TrainingRuns but not read
  Secrets, cannot make Fermata hand a Secret to a trainer, nor ask for a priority class,
  toleration, image or node selector the chart does not allow;
* namespaced mode (a second release): the operator is refused outside ``watchNamespaces`` even
  where some other grant would let it.

The policies' ``status.typeChecking`` is filled by kube-controller-manager's
validatingadmissionpolicy-status-controller, which the session's control plane does not run:
the module starts one more controller-manager with only that controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fermata_api import (
    CapacityType,
    CheckpointRef,
    RunRef,
    TrainerProgress,
    TrainerState,
    TrainerStatus,
    TrainingRunSpec,
)
from fermata_api.pod import ServiceAccountSpec
from fermata_dev.cluster import LocalControlPlane, wait_for_service_account
from fermata_operator import crdgen, podspec
from fermata_operator.planner.model import TRAINER_KEYS
from fermata_operator.settings import OperatorSettings
from fermata_trainer.reporter import KubernetesStatusReporter
from tests.e2e.conftest import GROUP, PLURAL, VERSION, spec, wait_for
from tests.e2e.test_chart import CHART, HELM, HELM_BUILD, _sa_kubeconfig, run_helm, template

TRAINER_MESSAGE = (
    "is written by the Fermata operator only; the trainer may write status.progress and status.lastCheckpoint"
)
# What the module's release allows tenants on top of the chart's defaults.
TEST_VALUES = [
    "--set",
    "tenancy.allowedPriorityClasses={fermata-batch}",
    "--set",
    "tenancy.allowedTolerationKeys={fermata.dev/dedicated}",
    "--set",
    "tenancy.allowedServiceAccounts={team-identity}",
]
NOW = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    """tools/helm/bin/helm (built on first use, as in test_chart.py)."""
    if not HELM.exists() and not Path("/usr/local/go/bin/go").exists():
        pytest.skip("no Go toolchain to build tools/helm/bin/helm")
    subprocess.run(["bash", str(HELM_BUILD)], check=True, timeout=1800, capture_output=True)
    return HELM


# ------------------------------------------------------------------------------------ no cluster


def test_status_guard_file_is_the_generated_one() -> None:
    on_disk = (CHART / "files" / "status-guard.yaml").read_text()
    assert on_disk == crdgen.render_status_guard(), "run: python -m fermata_operator.crdgen"
    rules = yaml.safe_load(on_disk)
    status = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    # First the trainer-identity rules, then one rule per operator-owned field.
    identity = crdgen.trainer_identity_validations()
    assert rules[: len(identity)] == identity
    guarded = {r["message"].split(" ", 1)[0].removeprefix("status.") for r in rules[len(identity) :]}
    assert guarded == set(status["properties"]) - TRAINER_KEYS
    assert set(re.findall(r"object\.\?status\.\?(\w+)", on_disk)) == guarded


def test_rendering(helm_bin: Path) -> None:
    docs = template(helm_bin, "fermata-system")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    names = {
        f"fermata-{p}"
        for p in (
            "status-guard",
            "tenancy",
            "operator-namespaces",
            "operator-owned",
            "operator-pods",
            "operator-roles",
            "operator-rolebindings",
            "operator-events",
        )
    }
    assert set(policies) == set(bindings) == names
    for name, binding in bindings.items():
        assert binding["spec"] == {"policyName": name, "validationActions": ["Deny"]}  # cluster-wide
        assert policies[name]["spec"]["failurePolicy"] == "Fail"
    operator = "system:serviceaccount:fermata-system:fermata"
    for name in names - {"fermata-status-guard", "fermata-tenancy"}:
        assert policies[name]["spec"]["matchConditions"] == [
            {"name": "the-operator", "expression": f"request.userInfo.username == '{operator}'"}
        ]
    guard = policies["fermata-status-guard"]["spec"]
    assert guard["matchConstraints"]["resourceRules"][0]["resources"] == ["trainingruns/status"]
    assert guard["validations"] == yaml.safe_load((CHART / "files" / "status-guard.yaml").read_text())
    # The chart grants no Secret access in any mode.
    for values in (
        [],
        ["-f", str(CHART / "ci" / "ha-values.yaml")],
        ["-f", str(CHART / "ci" / "namespaced-values.yaml")],
    ):
        for d in template(helm_bin, "fermata-system", *values):
            if d["kind"] in ("Role", "ClusterRole"):
                assert all("secrets" not in r["resources"] and "*" not in r["verbs"] for r in d["rules"]), d

    ns = template(helm_bin, "fermata-system", "-f", str(CHART / "ci" / "namespaced-values.yaml"))
    scoped = {d["metadata"]["name"]: d["spec"] for d in ns if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    selector = {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ml-team-a", "ml-team-b"]}
    for name in ("fermata-status-guard", "fermata-tenancy"):
        assert scoped[name]["matchResources"]["namespaceSelector"]["matchExpressions"] == [selector]
    assert "matchResources" not in scoped["fermata-operator-pods"]
    ns_policy = next(d for d in ns if d["metadata"]["name"] == "fermata-operator-namespaces")
    assert [v["expression"] for v in ns_policy["spec"]["validations"]] == [
        '!(request.namespace in ["kube-system","kube-public","kube-node-lease","fermata-system"])',
        'request.namespace in ["ml-team-a","ml-team-b"]',
    ]

    for bad in ("tenancy.allowedImagePrefixes={ghcr.io/fermata-dev}", "tenancy.allowedTolerationKeys={a b}"):
        proc = subprocess.run(
            [str(helm_bin), "template", "x", str(CHART), "--set", bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, (
            bad
        )

    off = template(helm_bin, "fermata-system", "--set", "admissionPolicies.enabled=false")
    assert not [d for d in off if d["kind"].startswith("ValidatingAdmissionPolicy")]

    proc = subprocess.run(
        [
            str(helm_bin),
            "template",
            "x",
            str(CHART),
            "-n",
            "fermata-system",
            "--set",
            "watchNamespaces={ml,fermata-system}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode != 0
        and "watchNamespaces: fermata-system is a namespace the operator may not write in" in proc.stderr
    )


# ----------------------------------------------------------------------------- against the cluster


@dataclass
class Release:
    name: str
    namespace: str
    sa: str
    operator: Any  # ApiClient authenticated with the operator ServiceAccount's token
    policies: list[str]


def _refusal(call: Callable[[], Any]) -> str:
    """The API server's message for a request admission refused (fails if it was accepted)."""
    try:
        call()
    except ApiException as exc:
        body = json.loads(exc.body)
        assert exc.status in (403, 422), body
        return str(body["message"])
    raise AssertionError("the API server accepted the request")


def _policy_refusal(call: Callable[[], Any]) -> str:
    message = _refusal(call)
    assert "ValidatingAdmissionPolicy" in message, message
    return message


def _token_client(
    control_plane: LocalControlPlane, core: Any, sa: str, ns: str, path: Path, pod: Any = None
) -> Any:
    """A client with a token of ServiceAccount ``sa``: bound to ``pod`` (as a kubelet asks for
    a pod's projected token), else unbound."""
    from kubernetes import config

    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if pod is not None:
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.metadata.name,
            "uid": pod.metadata.uid,
        }
    token = core.create_namespaced_service_account_token(sa, ns, {"spec": spec}).status.token
    return config.new_client_from_config(
        config_file=str(_sa_kubeconfig(control_plane.kubeconfig, token, path))
    )


@pytest.fixture(scope="module")
def policy_status_controller(
    control_plane: LocalControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    log = (tmp_path_factory.mktemp("vap-status") / "controller-manager.log").open("wb")
    proc = subprocess.Popen(
        [
            str(control_plane.binary),
            "controller-manager",
            f"--kubeconfig={control_plane.kubeconfig}",
            "--controllers=validatingadmissionpolicy-status-controller",
            "--leader-elect=false",
            "--secure-port=0",
            "--profiling=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _install(
    helm_bin: Path, control_plane: LocalControlPlane, k8s_api: Any, tmp: Path, release: str, *values: str
) -> Release:
    ns = f"{release}-system"
    core = client.CoreV1Api(k8s_api)
    core.create_namespace({"metadata": {"name": ns}})
    run_helm(helm_bin, "install", release, str(CHART), "-n", ns, *values, kubeconfig=control_plane.kubeconfig)
    wait_for_service_account(k8s_api, ns, name=release)
    operator = _token_client(control_plane, core, release, ns, tmp / f"{release}.kubeconfig")
    reg = client.AdmissionregistrationV1Api(k8s_api)
    names = [
        p.metadata.name
        for p in reg.list_validating_admission_policy(
            label_selector=f"app.kubernetes.io/instance={release}"
        ).items
    ]
    return Release(release, ns, release, operator, sorted(names))


def _uninstall(helm_bin: Path, control_plane: LocalControlPlane, k8s_api: Any, rel: Release) -> None:
    rel.operator.close()
    run_helm(helm_bin, "uninstall", rel.name, "-n", rel.namespace, kubeconfig=control_plane.kubeconfig)
    client.CoreV1Api(k8s_api).delete_namespace(rel.namespace)


def _fermata_sa(ns: str, run: dict[str, Any]) -> dict[str, Any]:
    """A run's own ServiceAccount as the operator renders it (spec.serviceAccount.annotations)."""
    identity = ServiceAccountSpec(annotations={"example.com/team": "audio"})
    obj = next(o for o in podspec.trainer_rbac(run, identity) if not podspec.is_identity(o))
    obj["metadata"]["namespace"] = ns
    return obj


@pytest.fixture(scope="module")
def release(
    helm_bin: Path,
    control_plane: LocalControlPlane,
    k8s_api: Any,
    crd: None,
    policy_status_controller: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Release]:
    rel = _install(
        helm_bin,
        control_plane,
        k8s_api,
        tmp_path_factory.mktemp("release"),
        f"fermata-vap-{uuid.uuid4().hex[:5]}",
        *TEST_VALUES,
    )
    try:
        # The policies act once the API server has loaded them: probe with a refused dry run.
        probe = client.CoreV1Api(rel.operator)
        body = {"metadata": {"name": "probe"}}

        def enforced() -> bool:
            try:
                probe.create_namespaced_service_account("default", body, dry_run="All")
            except ApiException as exc:
                return "ValidatingAdmissionPolicy" in exc.body
            return False

        wait_for(enforced, timeout=30, what="the release's policies enforced")
        yield rel
    finally:
        _uninstall(helm_bin, control_plane, k8s_api, rel)


@pytest.fixture(scope="module")
def tenant(
    control_plane: LocalControlPlane, k8s_api: Any, release: Release, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A namespace for runs (no Pod Security enforcement: the policies must refuse on their own),
    once the release's status guard is enforced in it."""
    name = f"tenant-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s_api)
    core.create_namespace({"metadata": {"name": name}})
    wait_for_service_account(k8s_api, name)
    _wait_for_status_guard(control_plane, k8s_api, release, name, tmp_path_factory.mktemp("guard-probe"))
    yield name
    custom = client.CustomObjectsApi(k8s_api)
    for obj in custom.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]:
        custom.delete_namespaced_custom_object(GROUP, VERSION, name, PLURAL, obj["metadata"]["name"])
    core.delete_namespace(name)


def _wait_for_status_guard(
    control_plane: LocalControlPlane, k8s_api: Any, release: Release, ns: str, tmp: Path
) -> None:
    """The API server loads each policy and binding on its own: one enforced (the release
    fixture's probe) does not mean all are. Probe the status guard itself with a dry run it must
    refuse: a status patch with an unbound token of the trainer ServiceAccount."""
    run = _run(k8s_api, ns, "guard-probe")
    _create_trainer_rbac(release.operator, run)
    unbound = client.CustomObjectsApi(
        _token_client(control_plane, client.CoreV1Api(k8s_api), "fermata-trainer", ns, tmp / "kubeconfig")
    )

    def enforced() -> bool:
        try:
            unbound.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, PLURAL, "guard-probe", {"status": {"message": "probe"}}, dry_run="All"
            )
        except ApiException as exc:
            return f"{release.name}-status-guard" in exc.body
        return False

    try:
        wait_for(enforced, timeout=60, what="the status guard enforced")
    finally:
        client.CustomObjectsApi(k8s_api).delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "guard-probe"
        )


def _run(k8s_api: Any, ns: str, name: str, **overrides: Any) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": spec(**overrides),
    }
    obj: dict[str, Any] = client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, body
    )
    return obj


def _create_trainer_rbac(api: Any, run: dict[str, Any]) -> None:
    """The trainer's ServiceAccount, Role and RoleBinding (the namespace's, shared by its runs),
    created as ``api`` (the operator); those already there are left as they are."""
    ns = run["metadata"]["namespace"]
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    for obj in podspec.trainer_rbac(run):
        create = {
            "ServiceAccount": core.create_namespaced_service_account,
            "Role": rbac.create_namespaced_role,
            "RoleBinding": rbac.create_namespaced_role_binding,
        }[obj["kind"]]
        try:
            create(ns, obj)
        except ApiException as exc:
            if exc.status != 409:
                raise


@pytest.mark.cluster
def test_policies_type_check_clean(k8s_api: Any, release: Release) -> None:
    assert len(release.policies) == 8, release.policies
    reg = client.AdmissionregistrationV1Api(k8s_api)

    def checked() -> bool:
        for name in release.policies:
            policy = reg.read_validating_admission_policy(name)
            if policy.status is None or policy.status.observed_generation != policy.metadata.generation:
                return False
        return True

    wait_for(checked, timeout=60, what="typeChecking of every policy")
    for name in release.policies:
        tc = reg.read_validating_admission_policy(name).status.type_checking
        assert tc is not None and not tc.expression_warnings, (name, tc)


# --------------------------------------------------------------------------------- status guard


@pytest.mark.cluster
def test_trainer_cannot_forge_status(
    control_plane: LocalControlPlane, k8s_api: Any, release: Release, tenant: str, tmp_path: Path
) -> None:
    run = _run(k8s_api, tenant, "forge")
    # The operator (its own token) creates the trainer's ServiceAccount, Role and RoleBinding
    # exactly as it renders them, and writes a status: every field is the operator's to write.
    _create_trainer_rbac(release.operator, run)
    as_operator = client.CustomObjectsApi(release.operator)
    segment = {"pod": "forge-0", "node": "n1", "start": NOW, "end": NOW, "hourlyUSD": 0.39, "usd": 12.5}
    as_operator.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        tenant,
        PLURAL,
        "forge",
        {
            "status": {
                "phase": "BudgetExceeded",
                "interruptions": 3,
                "pod": {"name": "forge-0", "incarnation": 0},
                "cost": {"accruedUSD": 612.0, "budgetUSD": 600, "segments": [segment]},
            }
        },
    )

    # The trainer: the token the kubelet gets for the run's pod (bound to forge-0).
    pod = client.CoreV1Api(release.operator).create_namespaced_pod(tenant, _trainer_pod(run))
    trainer = _token_client(
        control_plane, client.CoreV1Api(k8s_api), "fermata-trainer", tenant, tmp_path / "t.kubeconfig", pod
    )
    as_trainer = client.CustomObjectsApi(trainer)

    def patch(status: dict[str, Any]) -> Any:
        return as_trainer.patch_namespaced_custom_object_status(
            GROUP, VERSION, tenant, PLURAL, "forge", {"status": status}
        )

    try:
        attacks = {
            "pod": {"pod": {"name": "someone-else", "incarnation": 0}},
            "cost": {
                "cost": {"segments": [segment, {**segment, "pod": "forge-1", "hourlyUSD": 0, "usd": 0}]}
            },
            "phase": {"phase": "Pending"},
            "interruptions": {"interruptions": 0},
        }
        for field, status in attacks.items():
            message = _policy_refusal(lambda status=status: patch(status))
            assert (
                f"{release.name}-status-guard" in message and f"status.{field} {TRAINER_MESSAGE}" in message
            )
        assert f"status.cost {TRAINER_MESSAGE}" in _policy_refusal(lambda: patch({"cost": {"segments": []}}))
        assert f"status.cost {TRAINER_MESSAGE}" in _policy_refusal(lambda: patch({"cost": {"accruedUSD": 0}}))
        # The trainer's own fields.
        patch({"progress": {"state": "Training", "heartbeatTime": NOW, "step": 40, "totalSteps": 100}})
        patch(
            {
                "lastCheckpoint": {
                    "uri": "s3://ml-runs/test/checkpoints/step-000000040/manifest.json",
                    "step": 40,
                    "digest": "sha256:" + "0" * 64,
                    "time": NOW,
                }
            }
        )
        # And as the trainer really reports: server-side apply, field manager fermata-trainer.
        reporter = KubernetesStatusReporter(RunRef(name="forge", namespace=tenant), api_client=trainer)
        checkpoint = CheckpointRef(
            uri="s3://ml-runs/test/checkpoints/step-000000040/manifest.json",
            step=40,
            digest="sha256:" + "0" * 64,
            time=datetime.now(UTC),
        )
        progress = TrainerProgress(
            state=TrainerState.training, heartbeat_time=datetime.now(UTC), step=41, total_steps=100
        )
        reporter.apply(TrainerStatus(progress=progress, last_checkpoint=checkpoint))
        status = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
            GROUP, VERSION, tenant, PLURAL, "forge"
        )["status"]
        assert status["phase"] == "BudgetExceeded" and status["interruptions"] == 3
        assert status["cost"]["segments"] == [segment] and status["progress"]["step"] == 41
        assert status["lastCheckpoint"]["step"] == 40
        # And the operator still writes everything.
        as_operator.patch_namespaced_custom_object_status(
            GROUP, VERSION, tenant, PLURAL, "forge", {"status": {"phase": "Running", "interruptions": 4}}
        )
    finally:
        trainer.close()


@pytest.mark.cluster
def test_a_trainer_token_reports_only_to_its_own_run(
    control_plane: LocalControlPlane, k8s_api: Any, release: Release, tenant: str, tmp_path: Path
) -> None:
    """The trainers of a namespace share one ServiceAccount and one Role (patch trainingruns/
    status); the status-guard policy keeps each to its own run: a token bound to run A's pod
    patches A's status, not B's, and neither spec; an unbound token of that ServiceAccount
    patches nothing; a pod the run has moved on from (status.pod is the next one) neither."""
    admin_core = client.CoreV1Api(k8s_api)
    as_operator = client.CustomObjectsApi(release.operator)
    pods = {}
    for name in ("iso-a", "iso-b"):
        run = _run(k8s_api, tenant, name)
        _create_trainer_rbac(release.operator, run)
        pods[name] = client.CoreV1Api(release.operator).create_namespaced_pod(tenant, _trainer_pod(run))
        as_operator.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            tenant,
            PLURAL,
            name,
            {"status": {"phase": "Running", "pod": {"name": f"{name}-0", "incarnation": 0}}},
        )
    assert (
        pods["iso-a"].spec.service_account_name
        == pods["iso-b"].spec.service_account_name
        == "fermata-trainer"
    )
    a_client = _token_client(
        control_plane, admin_core, "fermata-trainer", tenant, tmp_path / "a.kubeconfig", pods["iso-a"]
    )
    unbound = _token_client(control_plane, admin_core, "fermata-trainer", tenant, tmp_path / "u.kubeconfig")
    progress = TrainerProgress(
        state=TrainerState.training, heartbeat_time=datetime.now(UTC), step=7, total_steps=100
    )
    try:
        # A's pod reports to A, as the trainer does (server-side apply).
        KubernetesStatusReporter(RunRef(name="iso-a", namespace=tenant), api_client=a_client).apply(
            TrainerStatus(progress=progress)
        )
        assert (
            client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
                GROUP, VERSION, tenant, PLURAL, "iso-a"
            )["status"]["progress"]["step"]
            == 7
        )
        # ... but not to B: the same ServiceAccount and Role, refused by the status guard.
        to_b = KubernetesStatusReporter(RunRef(name="iso-b", namespace=tenant), api_client=a_client)
        message = _policy_refusal(lambda: to_b.apply(TrainerStatus(progress=progress)))
        assert f"{release.name}-status-guard" in message
        assert "may patch only the status of the TrainingRun whose current pod" in message
        b_status = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
            GROUP, VERSION, tenant, PLURAL, "iso-b"
        )["status"]
        assert "progress" not in b_status
        # Neither run's spec (nor reading runs at all): RBAC, the Role has patch on status only.
        as_a = client.CustomObjectsApi(a_client)
        body = {"spec": {"budget": {"maxUSD": 1_000_000}}}
        for target in ("iso-a", "iso-b"):
            assert "cannot patch resource" in _refusal(
                lambda target=target: as_a.patch_namespaced_custom_object(
                    GROUP, VERSION, tenant, PLURAL, target, body
                )
            )
            assert "cannot get resource" in _refusal(
                lambda target=target: as_a.get_namespaced_custom_object(
                    GROUP, VERSION, tenant, PLURAL, target
                )
            )
        # Through its own status subresource, a spec change is dropped by the API server.
        before = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
            GROUP, VERSION, tenant, PLURAL, "iso-a"
        )["spec"]
        as_a.patch_namespaced_custom_object_status(GROUP, VERSION, tenant, PLURAL, "iso-a", body)
        after = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
            GROUP, VERSION, tenant, PLURAL, "iso-a"
        )["spec"]
        assert after == before and after["budget"]["maxUSD"] != 1_000_000
        # An unbound token of the trainer ServiceAccount says nothing about its run: refused.
        own = KubernetesStatusReporter(RunRef(name="iso-a", namespace=tenant), api_client=unbound)
        assert "only with the token of that run's pod" in _policy_refusal(
            lambda: own.apply(TrainerStatus(progress=progress))
        )
        # The run moved on to its next pod: the old pod's token is refused too.
        as_operator.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            tenant,
            PLURAL,
            "iso-a",
            {"status": {"pod": {"name": "iso-a-1", "incarnation": 1}}},
        )
        mine = KubernetesStatusReporter(RunRef(name="iso-a", namespace=tenant), api_client=a_client)
        assert "whose current pod" in _policy_refusal(lambda: mine.apply(TrainerStatus(progress=progress)))
    finally:
        a_client.close()
        unbound.close()


# ---------------------------------------------------------------------------- operator identity


def _trainer_pod(run: dict[str, Any]) -> dict[str, Any]:
    return podspec.trainer_pod(
        run,
        TrainingRunSpec.model_validate(run["spec"]),
        OperatorSettings(),
        incarnation=0,
        capacity=CapacityType.spot,
        resume_from=None,
    )


@pytest.mark.cluster
def test_operator_identity_is_limited(k8s_api: Any, release: Release, tenant: str) -> None:
    run = _run(
        k8s_api,
        tenant,
        "limits",
        storage={"checkpoints": "s3://ml-runs/test/", "credentialsSecret": "s3-creds"},
    )
    core, rbac = client.CoreV1Api(release.operator), client.RbacAuthorizationV1Api(release.operator)
    admin = client.CoreV1Api(k8s_api)

    # The namespace's trainer identity, a run's own ServiceAccount, and the pod, as the operator
    # renders them: allowed.
    _create_trainer_rbac(release.operator, run)
    good = _trainer_pod(run)
    core.create_namespaced_pod(tenant, good, dry_run="All")
    core.create_namespaced_service_account(tenant, _fermata_sa(tenant, run), dry_run="All")
    # ConfigMaps: the operator writes none (RBAC refuses before any policy).
    assert 'cannot create resource "configmaps"' in _refusal(
        lambda: core.create_namespaced_config_map(tenant, {"metadata": {"name": "x"}}, dry_run="All")
    )
    event = {
        "metadata": {"name": "limits.probe", "namespace": tenant},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "name": "limits",
            "namespace": tenant,
        },
        "reason": "Probe",
        "message": "probe",
        "type": "Normal",
    }
    core.create_namespaced_event(tenant, event, dry_run="All")

    # A privileged, hostPID pod mounting the node's / — with every Fermata label and owner.
    evil = _trainer_pod(run)
    evil["spec"]["hostPID"] = True
    evil["spec"]["volumes"].append({"name": "root", "hostPath": {"path": "/"}})
    c = evil["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True, "runAsUser": 0}
    c["volumeMounts"].append({"name": "root", "mountPath": "/host"})
    message = _policy_refusal(lambda: core.create_namespaced_pod(tenant, evil, dry_run="All"))
    assert (
        f"{release.name}-operator-pods" in message
        and "no pods in the host network, PID or IPC namespace" in message
    )
    del evil["spec"]["hostPID"]
    assert "hostPath volumes" in _policy_refusal(
        lambda: core.create_namespaced_pod(tenant, evil, dry_run="All")
    )
    evil["spec"]["volumes"].pop()
    c["volumeMounts"].pop()
    assert "no privileged containers" in _policy_refusal(
        lambda: core.create_namespaced_pod(tenant, evil, dry_run="All")
    )
    # As another ServiceAccount, from another image.
    other_sa = {**good, "spec": {**good["spec"], "serviceAccountName": "default"}}
    assert (
        "run as the namespace's fermata-trainer ServiceAccount, their run's own (limits-trainer) or one of "
        "tenancy.allowedServiceAccounts, not default"
        in _policy_refusal(lambda: core.create_namespaced_pod(tenant, other_sa, dry_run="All"))
    )
    miner = yaml.safe_load(yaml.safe_dump(good))
    miner["spec"]["containers"][0]["image"] = "docker.io/evil/miner:1"
    assert "runs images only from ghcr.io/fermata-dev/" in _policy_refusal(
        lambda: core.create_namespaced_pod(tenant, miner, dry_run="All")
    )
    # A pod without a TrainingRun owner.
    orphan = yaml.safe_load(yaml.safe_dump(good))
    del orphan["metadata"]["ownerReferences"]
    message = _policy_refusal(lambda: core.create_namespaced_pod(tenant, orphan, dry_run="All"))
    assert f"{release.name}-operator-owned" in message and "must be controlled by the TrainingRun" in message
    plain = {"metadata": {"name": "plain", "ownerReferences": good["metadata"]["ownerReferences"]}}
    assert (
        "serviceaccounts "
        + tenant
        + "/plain: what the Fermata operator writes must carry the labels fermata.dev/run"
        in (_policy_refusal(lambda: core.create_namespaced_service_account(tenant, plain, dry_run="All")))
    )
    # A "trainer identity" under another name, or owned by a run, or a run's object that calls
    # itself the identity: refused.
    identity = next(o for o in podspec.trainer_identity(tenant) if o["kind"] == "ServiceAccount")
    renamed = {**identity, "metadata": {**identity["metadata"], "name": "fermata-trainer2"}}
    _policy_refusal(lambda: core.create_namespaced_service_account(tenant, renamed, dry_run="All"))
    owned = {
        **identity,
        "metadata": {**identity["metadata"], "ownerReferences": good["metadata"]["ownerReferences"]},
    }
    _policy_refusal(lambda: core.create_namespaced_service_account(tenant, owned, dry_run="All"))

    # Secrets: the chart grants none (RBAC answers 403, not a policy).
    secret = f"creds-{uuid.uuid4().hex[:5]}"
    admin.create_namespaced_secret("kube-system", {"metadata": {"name": secret}, "data": {}})
    with pytest.raises(ApiException) as err:
        core.read_namespaced_secret(secret, "kube-system")
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        core.list_namespaced_secret(tenant)
    assert err.value.status == 403

    # kube-system/aws-auth: RBAC (cluster-wide mode) would let the operator patch it.
    with contextlib.suppress(ApiException):
        admin.create_namespaced_config_map(
            "kube-system", {"metadata": {"name": "aws-auth"}, "data": {"mapRoles": "[]"}}
        )
    message = _refusal(
        lambda: core.patch_namespaced_config_map(
            "aws-auth",
            "kube-system",
            {"data": {"mapRoles": "- rolearn: arn:aws:iam::1:role/evil\n  groups: [system:masters]"}},
            dry_run="All",
        )
    )
    assert "kube-system" in message
    # A tenant's own ServiceAccount (no Fermata labels) cannot be deleted, even in a run namespace.
    admin.create_namespaced_service_account(tenant, {"metadata": {"name": "team-identity"}})
    assert (
        "serviceaccounts " + tenant + "/team-identity: what the Fermata operator writes must carry the labels"
        in _policy_refusal(
            lambda: core.delete_namespaced_service_account("team-identity", tenant, dry_run="All")
        )
    )
    # Nor can a tenant's pod be deleted (RBAC lets the operator delete pods).
    admin.create_namespaced_pod(
        tenant, {"metadata": {"name": "web"}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
    )
    assert (
        "pods " + tenant + "/web: what the Fermata operator writes must carry the labels"
        in _policy_refusal(lambda: core.delete_namespaced_pod("web", tenant, dry_run="All"))
    )
    # Nor can Fermata's objects be written in a system namespace.
    assert "may not write serviceaccounts in namespace kube-public" in _policy_refusal(
        lambda: core.create_namespaced_service_account(
            "kube-public", _fermata_sa("kube-public", run), dry_run="All"
        )
    )

    # RoleBindings: to cluster-admin (RBAC's escalation check or the policy), to a ClusterRole
    # the operator holds (the policy), to another subject (the policy).
    rb = next(o for o in podspec.trainer_rbac(run) if o["kind"] == "RoleBinding")
    to_admin = {
        **rb,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
    }
    _refusal(lambda: rbac.create_namespaced_role_binding(tenant, to_admin, dry_run="All"))
    held = {**rb, "roleRef": {**to_admin["roleRef"], "name": f"{release.name}-runs"}}
    assert f"bind the Role fermata-trainer, not ClusterRole {release.name}-runs" in _policy_refusal(
        lambda: rbac.create_namespaced_role_binding(tenant, held, dry_run="All")
    )
    to_default = {**rb, "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": tenant}]}
    assert "bind only fermata-trainer, the ServiceAccount named like the binding" in _policy_refusal(
        lambda: rbac.create_namespaced_role_binding(tenant, to_default, dry_run="All")
    )
    # A Role with a verb the operator holds but the trainer must not get, or another name.
    role = next(o for o in podspec.trainer_rbac(run) if o["kind"] == "Role")
    pods = {**role, "rules": [*role["rules"], {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}
    assert "the only Role the Fermata operator creates is fermata-trainer" in _policy_refusal(
        lambda: rbac.create_namespaced_role(tenant, pods, dry_run="All")
    )
    reads = {**role, "rules": [{**role["rules"][0], "verbs": ["get", "patch"]}]}
    _policy_refusal(lambda: rbac.create_namespaced_role(tenant, reads, dry_run="All"))
    spec_too = {**role, "rules": [{**role["rules"][0], "resources": ["trainingruns", "trainingruns/status"]}]}
    _policy_refusal(lambda: rbac.create_namespaced_role(tenant, spec_too, dry_run="All"))
    # Events about something else.
    about_secret = {
        **event,
        "involvedObject": {"apiVersion": "v1", "kind": "Secret", "name": "s3-creds", "namespace": tenant},
    }
    assert "not Secret" in _policy_refusal(
        lambda: core.create_namespaced_event(tenant, about_secret, dry_run="All")
    )


# ------------------------------------------------------------------------------ confused deputy


@pytest.fixture(scope="module")
def alice(control_plane: LocalControlPlane, k8s_api: Any, tenant: str) -> Iterator[Any]:
    """User alice (impersonated): trainingruns create/get/patch in the tenant namespace, nothing else."""
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    rbac.create_namespaced_role(
        tenant,
        {
            "metadata": {"name": "run-author"},
            "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["create", "get", "patch"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        tenant,
        {
            "metadata": {"name": "alice-run-author"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "run-author"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
        },
    )
    api = control_plane.api_client()
    api.set_default_header("Impersonate-User", "alice")
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": "rbac-probe"},
        "spec": spec(),
    }
    wait_for(
        lambda: custom.create_namespaced_custom_object(GROUP, VERSION, tenant, PLURAL, body, dry_run="All"),
        timeout=30,
        what="alice's Role in effect",
    )
    yield api
    api.close()


CASES = {
    "secret": (
        {"storage": {"checkpoints": "s3://ml-runs/test/", "credentialsSecret": "s3-creds"}},
        "spec.storage.credentialsSecret: you may not read Secret s3-creds in namespace {ns}, so Fermata will not hand it to the trainer",
    ),
    "priority": (
        {"resources": {"priorityClassName": "system-node-critical"}},
        "spec.resources.priorityClassName: system-node-critical is not allowed; allowed: fermata-batch (chart value tenancy.allowedPriorityClasses)",
    ),
    "tolerate-everything": (
        {"resources": {"tolerations": [{"operator": "Exists"}]}},
        "spec.resources.tolerations or spec.preparation.resources.tolerations: a toleration without a key (operator Exists) tolerates every taint",
    ),
    "toleration-key": (
        {
            "resources": {
                "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]
            }
        },
        "spec.resources.tolerations or spec.preparation.resources.tolerations: taint key(s) node-role.kubernetes.io/control-plane may not be tolerated; allowed: fermata.dev/dedicated",
    ),
    "image": (
        {"resources": {"image": "docker.io/evil/miner:1"}},
        "spec.resources.image: docker.io/evil/miner:1 is not from an allowed registry; allowed prefixes: ghcr.io/fermata-dev/",
    ),
    "image-lookalike": (
        {"resources": {"image": "ghcr.io/fermata-dev-evil/fermata-trainer:1"}},
        "spec.resources.image: ghcr.io/fermata-dev-evil/fermata-trainer:1 is not from an allowed registry",
    ),
    "service-account": (
        {"serviceAccount": {"name": "cluster-power"}},
        "spec.serviceAccount.name: cluster-power is not allowed: it must be in the chart value tenancy.allowedServiceAccounts (team-identity)",
    ),
    # allowed by the chart, but she may not mint its tokens herself
    "service-account-without-token-rights": (
        {"serviceAccount": {"name": "team-identity"}},
        "spec.serviceAccount.name: team-identity is not allowed",
    ),
    "pod-secret-env": (
        {
            "pod": {
                "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "k"}}}]
            }
        },
        "spec.pod: it hands the trainer a Secret you may not read in namespace {ns}",
    ),
    "pod-secret-volume": (
        {
            "pod": {
                "volumes": [{"name": "creds", "projected": {"sources": [{"secret": {"name": "s3-creds"}}]}}]
            }
        },
        "spec.pod: it hands the trainer a Secret you may not read in namespace {ns}",
    ),
    "node-selector": (
        {
            "resources": {
                "nodeSelector": {"kubernetes.io/hostname": "gpu-1", "topology.kubernetes.io/zone": "a"}
            }
        },
        "spec.resources.nodeSelector or spec.preparation.resources.nodeSelector: label key(s) kubernetes.io/hostname may not be selected",
    ),
    # the preparation pod's placement is checked like the trainer pod's
    "preparation-toleration-key": (
        {
            "preparation": {
                "resources": {
                    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]
                }
            }
        },
        "spec.resources.tolerations or spec.preparation.resources.tolerations: taint key(s) "
        "node-role.kubernetes.io/control-plane may not be tolerated",
    ),
    "preparation-node-selector": (
        {"preparation": {"resources": {"nodeSelector": {"kubernetes.io/hostname": "cpu-1"}}}},
        "spec.resources.nodeSelector or spec.preparation.resources.nodeSelector: label key(s) "
        "kubernetes.io/hostname may not be selected",
    ),
}


def _spec(patch: dict[str, Any]) -> dict[str, Any]:
    base = spec()
    for key, value in patch.items():
        base[key] = {**base.get(key, {}), **value}
    return base


@pytest.mark.cluster
@pytest.mark.parametrize("case", sorted(CASES))
def test_tenant_cannot_use_fermata_as_a_deputy(alice: Any, release: Release, tenant: str, case: str) -> None:
    patch, expected = CASES[case]
    custom = client.CustomObjectsApi(alice)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": f"deputy-{case}"},
        "spec": _spec(patch),
    }
    message = _policy_refusal(
        lambda: custom.create_namespaced_custom_object(GROUP, VERSION, tenant, PLURAL, body, dry_run="All")
    )
    assert f"{release.name}-tenancy" in message and expected.format(ns=tenant) in message, message


@pytest.mark.cluster
def test_tenant_gets_what_she_may_have(alice: Any, k8s_api: Any, tenant: str) -> None:
    custom = client.CustomObjectsApi(alice)

    def create(name: str, patch: dict[str, Any], dry_run: str | None = "All") -> Any:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": name},
            "spec": _spec(patch),
        }
        return custom.create_namespaced_custom_object(GROUP, VERSION, tenant, PLURAL, body, dry_run=dry_run)

    # What the chart's tenancy values allow.
    create(
        "allowed",
        {
            "resources": {
                "priorityClassName": "fermata-batch",
                "tolerations": [
                    {
                        "key": "fermata.dev/dedicated",
                        "operator": "Equal",
                        "value": "ml",
                        "effect": "NoSchedule",
                    }
                ],
                "nodeSelector": {
                    "topology.kubernetes.io/zone": "eu-west-1a",
                    "nvidia.com/gpu.product": "Tesla-T4",
                },
                "image": "ghcr.io/fermata-dev/fermata-trainer:0.1.0",
            }
        },
    )
    # A Secret she may read.
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    rbac.create_namespaced_role(
        tenant,
        {
            "metadata": {"name": "read-s3-creds"},
            "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s3-creds"], "verbs": ["get"]}
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        tenant,
        {
            "metadata": {"name": "alice-read-s3-creds"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-s3-creds"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
        },
    )
    secret = {"storage": {"checkpoints": "s3://ml-runs/test/", "credentialsSecret": "s3-creds"}}
    wait_for(lambda: create("with-secret", secret), timeout=30, what="alice may hand s3-creds to Fermata")
    # Another one she may not.
    other = {"storage": {"checkpoints": "s3://ml-runs/test/", "credentialsSecret": "team-creds"}}
    assert "you may not read Secret team-creds" in _policy_refusal(lambda: create("other-secret", other))

    # An allowed ServiceAccount whose tokens she may create herself.
    rbac.create_namespaced_role(
        tenant,
        {
            "metadata": {"name": "team-identity-tokens"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["serviceaccounts/token"],
                    "resourceNames": ["team-identity"],
                    "verbs": ["create"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        tenant,
        {
            "metadata": {"name": "alice-team-identity-tokens"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "team-identity-tokens",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
        },
    )
    # a Secret she may read, handed to the trainer through spec.pod
    readable = {"pod": {"envFrom": [{"secretRef": {"name": "s3-creds"}}]}}
    create("pod-secret-readable", readable)
    identity = {"serviceAccount": {"name": "team-identity"}}
    wait_for(lambda: create("with-identity", identity), timeout=30, what="alice may name team-identity")

    # Updates: a run someone else (the admin) made with team-creds. Alice may suspend it (the
    # trainer gets nothing new) but not change what the trainer runs with that Secret.
    _run(k8s_api, tenant, "bobs", storage=other["storage"])

    def patch_spec(body: dict[str, Any], name: str = "bobs") -> Any:
        return custom.patch_namespaced_custom_object(
            GROUP, VERSION, tenant, PLURAL, name, {"spec": body}, dry_run="All"
        )

    patch_spec({"suspend": True})
    patch_spec({"budget": {"maxUSD": 700}})
    assert "you may not read Secret team-creds" in _policy_refusal(
        lambda: patch_spec({"resources": {"image": "ghcr.io/fermata-dev/fermata-trainer:0.2.0"}})
    )
    # Her own run: the allow-lists hold for updates too (checked when the field changes).
    create(
        "mine", {"resources": {"tolerations": [{"key": "fermata.dev/dedicated", "operator": "Exists"}]}}, None
    )
    patch_spec({"budget": {"maxUSD": 650}}, "mine")
    assert "taint key(s) dedicated may not be tolerated" in _policy_refusal(
        lambda: patch_spec(
            {"resources": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}}, "mine"
        )
    )
    assert "spec.resources.image: quay.io/x/y:1 is not from an allowed registry" in _policy_refusal(
        lambda: patch_spec({"resources": {"image": "quay.io/x/y:1"}}, "mine")
    )


# ------------------------------------------------------------------------------- namespaced mode


@pytest.mark.cluster
def test_namespaced_operator_is_refused_outside_its_namespaces(
    helm_bin: Path,
    control_plane: LocalControlPlane,
    k8s_api: Any,
    release: Release,
    tenant: str,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(k8s_api)
    watched = f"watched-{uuid.uuid4().hex[:5]}"
    core.create_namespace({"metadata": {"name": watched}})
    rel = _install(
        helm_bin,
        control_plane,
        k8s_api,
        tmp_path,
        f"fermata-ns-{uuid.uuid4().hex[:5]}",
        "--set",
        f"watchNamespaces={{{watched}}}",
    )
    try:
        run = _run(k8s_api, watched, "scoped")
        as_operator = client.CoreV1Api(rel.operator)
        own = _fermata_sa(watched, run)
        wait_for(
            lambda: as_operator.create_namespaced_service_account(watched, own, dry_run="All"),
            timeout=30,
            what="the chart's Role",
        )
        # A stray grant outside watchNamespaces (RBAC would allow it): the policy still refuses.
        rbac = client.RbacAuthorizationV1Api(k8s_api)
        rbac.create_namespaced_role(
            tenant,
            {
                "metadata": {"name": f"{rel.name}-stray"},
                "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            tenant,
            {
                "metadata": {"name": f"{rel.name}-stray"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": f"{rel.name}-stray",
                },
                "subjects": [{"kind": "ServiceAccount", "name": rel.sa, "namespace": rel.namespace}],
            },
        )
        stray = _fermata_sa(tenant, run)

        def refused() -> str | None:
            try:
                as_operator.create_namespaced_service_account(tenant, stray, dry_run="All")
            except ApiException as exc:
                message = str(json.loads(exc.body)["message"])
                return message if "ValidatingAdmissionPolicy" in message else None  # RBAC: not yet
            return None  # the policy is not loaded yet

        message = wait_for(refused, timeout=30, what="RBAC allows, the policy refuses")
        assert f"{rel.name}-operator-namespaces" in message
        assert (
            f"may not write serviceaccounts in namespace {tenant}: it watches only {watched} (chart value watchNamespaces)"
            in message
        )
    finally:
        _uninstall(helm_bin, control_plane, k8s_api, rel)
        core.delete_namespace(watched)
        rbac = client.RbacAuthorizationV1Api(k8s_api)
        with contextlib.suppress(ApiException):
            rbac.delete_namespaced_role_binding(f"{rel.name}-stray", tenant)
        with contextlib.suppress(ApiException):
            rbac.delete_namespaced_role(f"{rel.name}-stray", tenant)
