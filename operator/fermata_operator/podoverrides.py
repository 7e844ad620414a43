"""``spec.pod``: the user's additions merged into the trainer pod the operator built.

The CRD refuses at admission what would replace the operator's own settings; this merge keeps
them regardless (defence in depth, for a run stored before a rule existed): an operator label,
annotation, variable, volume or mount path always wins, a colliding addition is dropped.
"""

from __future__ import annotations

import copy
from typing import Any

from fermata_api import contract
from fermata_api.pod import (
    RESERVED_ENV,
    RESERVED_MOUNT_DIRS,
    RESERVED_MOUNT_PATHS,
    RESERVED_NODE_LABELS,
    RESERVED_VOLUMES,
    PodOverrides,
)

#: Contract variables pinned (to empty when unused) once envFrom could bring them in.
_PINNED_ENV = (
    contract.ENV_RESUME_FROM,
    contract.ENV_RESUME_DIGEST,
    contract.ENV_RESUME_EXPLICIT,
)


def _operator_key(key: str) -> bool:
    domain = key.partition("/")[0] if "/" in key else ""
    return key == "fermata.dev" or domain == "fermata.dev" or domain.endswith(".fermata.dev")


def _merge_map(own: dict[str, str], extra: dict[str, str] | None) -> dict[str, str]:
    """``own`` plus the additions whose keys neither ``own`` nor the fermata.dev domain hold."""
    added = {k: v for k, v in (extra or {}).items() if k not in own and not _operator_key(k)}
    return {**own, **added}


def _allowed_env(name: str, taken: set[str]) -> bool:
    return name not in taken and not name.startswith("FERMATA_") and name not in RESERVED_ENV


def _merge_env(container: dict[str, Any], pod: PodOverrides) -> None:
    env: list[dict[str, Any]] = container["env"]
    taken = {e["name"] for e in env}
    env.extend(e.wire() for e in pod.env or [] if _allowed_env(e.name, taken))
    sources = [s.wire() for s in pod.env_from or [] if not (s.prefix or "").startswith("FERMATA_")]
    if sources:
        # Explicit variables take precedence over envFrom: a ConfigMap key cannot stand in for one
        # the operator leaves unset.
        env.extend({"name": n, "value": ""} for n in _PINNED_ENV if n not in taken)
        container["envFrom"] = sources


def _reserved_path(path: str) -> bool:
    if path in RESERVED_MOUNT_PATHS:
        return True
    return any(path == d or path.startswith(d + "/") or d.startswith(path + "/") for d in RESERVED_MOUNT_DIRS)


def _merge_volumes(spec: dict[str, Any], container: dict[str, Any], pod: PodOverrides) -> None:
    own = {v["name"] for v in spec["volumes"]}
    added = [v.wire() for v in pod.volumes or [] if v.name not in own and v.name not in RESERVED_VOLUMES]
    names = {v["name"] for v in added}
    spec["volumes"].extend(added)
    container["volumeMounts"].extend(
        m.wire() for m in pod.volume_mounts or [] if m.name in names and not _reserved_path(m.mount_path)
    )


def _requirements(term: dict[str, Any]) -> list[dict[str, Any]]:
    exprs: list[dict[str, Any]] = term.get("matchExpressions") or []
    return [e for e in exprs if e.get("key") not in RESERVED_NODE_LABELS]


def _merge_affinity(spec: dict[str, Any], pod: PodOverrides) -> None:
    """Each of the user's required terms is ANDed with each of the operator's (terms are ORed,
    so the result is their product); preferred terms are added as they are."""
    node = pod.affinity.node_affinity if pod.affinity else None
    if node is None:
        return
    ours = spec["affinity"]["nodeAffinity"]
    required = node.required_during_scheduling_ignored_during_execution
    if required is not None:
        selector = ours["requiredDuringSchedulingIgnoredDuringExecution"]
        user_terms = [_requirements(t.wire()) for t in required.node_selector_terms]
        selector["nodeSelectorTerms"] = [
            {**own, "matchExpressions": [*own["matchExpressions"], *extra]}
            for own in selector["nodeSelectorTerms"]
            for extra in user_terms
        ]
    preferred = [p.wire() for p in node.preferred_during_scheduling_ignored_during_execution or []]
    for p in preferred:
        p["preference"]["matchExpressions"] = _requirements(p["preference"])
    preferred = [p for p in preferred if p["preference"]["matchExpressions"]]
    if preferred:
        ours["preferredDuringSchedulingIgnoredDuringExecution"] = preferred


def apply(pod_obj: dict[str, Any], overrides: PodOverrides | None) -> dict[str, Any]:
    """``pod_obj`` with ``overrides`` merged in (a new object; the argument is not changed)."""
    if overrides is None:
        return pod_obj
    pod = copy.deepcopy(pod_obj)
    meta, spec = pod["metadata"], pod["spec"]
    container = spec["containers"][0]
    meta["labels"] = _merge_map(meta["labels"], overrides.labels)
    meta["annotations"] = _merge_map(meta.get("annotations") or {}, overrides.annotations)
    _merge_env(container, overrides)
    _merge_volumes(spec, container, overrides)
    _merge_affinity(spec, overrides)
    if overrides.image_pull_secrets:
        spec["imagePullSecrets"] = [s.wire() for s in overrides.image_pull_secrets]
    if overrides.topology_spread_constraints:
        spec["topologySpreadConstraints"] = [t.wire() for t in overrides.topology_spread_constraints]
    return pod
