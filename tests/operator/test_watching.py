"""What the operator asks the API server to send it: only Fermata's pods, only candidate nodes.

The selectors are checked through kopf's own lookup (``SelectorMapping.collect``, which its
watch and list requests use to build ``labelSelector``), against the resources as kopf
discovers them."""

from __future__ import annotations

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from fermata_api import contract
from fermata_operator.handlers import SlimDiffBaseStorage, watch_only_ours
from fermata_operator.settings import OperatorSettings
from tests.operator.factories import run

PODS = Resource(group="", version="v1", plural="pods", kind="Pod", namespaced=True)
NODES = Resource(group="", version="v1", plural="nodes", kind="Node", namespaced=False)
RUNS = Resource(
    group=contract.API_GROUP, version=contract.API_VERSION, plural=contract.PLURAL, kind=contract.KIND
)


def test_pods_are_selected_by_fermatas_label_and_nodes_by_the_configured_selector() -> None:
    settings = kopf.OperatorSettings()
    watch_only_ours(settings, OperatorSettings(node_label_selector="karpenter.sh/capacity-type"))
    assert settings.watching.label_selectors.collect(PODS) == ["fermata.dev/run"]
    assert settings.watching.label_selectors.collect(NODES) == ["karpenter.sh/capacity-type"]
    # TrainingRuns themselves: every one.
    assert settings.watching.label_selectors.collect(RUNS) == []


def test_no_node_selector_watches_every_node() -> None:
    settings = kopf.OperatorSettings()
    watch_only_ours(settings, OperatorSettings())
    assert settings.watching.label_selectors.collect(NODES) == []
    assert settings.watching.label_selectors.collect(PODS) == ["fermata.dev/run"]


def test_the_selector_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERMATA_NODE_LABEL_SELECTOR", " nvidia.com/gpu.present=true ")
    assert OperatorSettings.from_env().node_label_selector == "nvidia.com/gpu.present=true"


def test_the_slim_diff_base_is_kopfs_essence_without_the_copy() -> None:
    """The essence kopf compares on every event is exactly the one kopf builds itself."""
    body = run(budget={"maxUSD": 40})
    body["metadata"].update(
        {
            "uid": "u-1",
            "resourceVersion": "42",
            "generation": 3,
            "finalizers": ["fermata.dev/operator"],
            "labels": {"team": "audio"},
            "annotations": {
                "note": "keep",
                "fermata.dev/last-handled-configuration": '{"spec": {}}',
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
            },
            "managedFields": [{"manager": "fermata-operator", "fieldsV1": {"f:status": {}}}] * 50,
        }
    )
    body["status"] = {"phase": "Running", "cost": {"segments": [{"pod": "p", "usd": 1.0}] * 200}}
    theirs = kopf.AnnotationsDiffBaseStorage(prefix="fermata.dev", key="last-handled-configuration")
    ours = SlimDiffBaseStorage(prefix="fermata.dev", key="last-handled-configuration")
    essence = ours.build(body=kopf.Body(body))
    assert essence == theirs.build(body=kopf.Body(body))
    assert "status" not in essence and essence["metadata"] == {
        "labels": {"team": "audio"},
        "annotations": {"note": "keep"},
    }
    assert ours.fetch(body=kopf.Body(body)) == theirs.fetch(body=kopf.Body(body))
    # A copy: changing the body later does not change the essence.
    body["spec"]["budget"]["maxUSD"] = 1
    assert essence["spec"]["budget"]["maxUSD"] == 40
