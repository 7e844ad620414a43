"""The run's policies, one module each: the verdict and the action it leads to, as data.

Every policy here is a pure function of the spec, the status and the observed facts; it returns
a :class:`~fermata_operator.policies.effects.Verdict` (conditions to set, Events to post, a stop
to carry out, when to look again) that the planner applies. Nothing here talks to Kubernetes,
AWS or the clock: an import contract (``make test``) keeps kubernetes, kopf and boto3 out.

===================  ==============================================================
``prices``           the price table (per-run overrides, the chart's table, built-ins)
``cost``             billed node-seconds × price, closed spans, projection, ETA
``budget``           warn, stop at the budget, stop on a projected overrun
``idle``             stale heartbeat, no progress, low GPU; preparation allowance
``pod_outcome``      what a pod's state means (interrupted, failed, config error ...)
``spot``             interruptions: budget, backoff, capacity for the next pod
``retry``            application failures: budget and backoff
``gates``            go/no-go milestones, relative gates, the final decision
``plateau``          early stopping when validation loss no longer improves
``deadline``         the run's wall-clock limit
``suspend``          spec.suspend: release the GPU, resume later
``checkpoint_risk``  the last checkpoint against the pod's grace period
===================  ==============================================================
"""
