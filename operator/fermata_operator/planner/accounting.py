"""Every pass first counts the money: billed spans from the pods, finalizers released once a
pod's span is closed in the status written with it, and no pod of an older incarnation left
running beside the current one."""

from __future__ import annotations

from fermata_operator.planner.context import Pass
from fermata_operator.policies import cost, prices
from fermata_operator.policies.pod_outcome import TERMINATING_PATIENCE_SECONDS, billing_end
from fermata_operator.views import PodView


def _billing(p: Pass, pod: PodView) -> cost.PodBilling:
    node = p.node_of(pod)
    outcome = p.outcomes[pod.name]
    summary = p.st.pod if p.st.pod is not None and p.st.pod.name == pod.name else None
    start = (pod.start_time or outcome.started) if pod.node_name else None
    return cost.PodBilling(
        pod=pod.name,
        node=pod.node_name,
        instance_type=(node.instance_type if node else None) or (summary.instance_type if summary else None),
        capacity_type=(node.capacity_type if node else None)
        or (summary.capacity_type if summary else None)
        or pod.capacity_annotation,
        start=start,
        end=billing_end(pod, outcome, p.node_missing(pod), p.now) if start else None,
    )


def _never_started(p: Pass, pod: PodView) -> bool:
    """A pod with no start can go without a span only once it cannot start any more: never
    placed, or ended as its kubelet reports, or its node gone, or its kubelet silent past the
    deletion deadline. A placed pod being deleted may still be started by its kubelet."""
    if not pod.node_name or pod.phase in {"Succeeded", "Failed"} or p.node_missing(pod):
        return True
    return pod.deletion is not None and (p.now - pod.deletion).total_seconds() > TERMINATING_PATIENCE_SECONDS


def account(p: Pass) -> None:
    """Cost status, finalizer releases and superseded pods for this pass."""
    assert p.spec is not None
    spec = p.spec
    bills = [_billing(p, pod) for pod in p.pods]
    fallback = prices.worst_case(spec.resources, p.obs.prices, spec.budget.prices)
    result = cost.compute(
        p.st.cost,
        bills,
        p.obs.prices,
        spec.budget.prices,
        fallback if fallback is not None else max(p.obs.prices.prices.values(), default=0.0),
        spec.budget.max_usd,
        p.now,
        cost.remaining_seconds(p.st.progress, spec),
    )
    prep = [s.usd for s in result.status.segments if s.pod.startswith(f"{p.name}-prep-")]
    if prep:
        result.status.preparation_usd = round(sum(prep), 6)
    p.st.cost = result.status
    if result.unpriced:
        p.accepted = (
            True,
            "UnknownPrice",
            "no price for " + ", ".join(result.unpriced) + f": billed at the highest allowed price "
            f"(${fallback or 0:.4f}/h) until one is added to spec.budget.prices or the price table",
        )
    for pod, bill in zip(p.pods, bills, strict=True):
        gone = pod.deleting or p.outcomes[pod.name].ended
        closed = pod.name in result.closed_pods or (bill.start is None and _never_started(p, pod))
        if pod.has_cost_finalizer and gone and closed:
            p.release_finalizer(pod.name)
            if pod.name not in result.closed_pods:
                p.plan.release_if_unstarted.add(pod.name)
    current, preparing = p.current, p.current_prep
    for pod in p.pods:
        if pod is not current and pod is not preparing and p.active(pod):
            p.stop_pod(pod.name, "superseded")
