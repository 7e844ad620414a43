"""``kubectl fermata``: look at and steer TrainingRuns from the command line.

* ``kubectl fermata status NAME`` — phase, decision, cost against budget, progress, losses,
  authenticity, last checkpoint, interruptions/failures and the conditions that are not OK.
* ``kubectl fermata report NAME [-o report.png]`` — the gate evidence table and a PNG of the
  training/validation loss by step and the accrued cost over time.
* ``kubectl fermata suspend NAME`` / ``resume NAME`` — set ``spec.suspend`` (the operator
  checkpoints and releases the GPU, or resumes from the last verified checkpoint).
* ``kubectl fermata logs NAME [--tail N] [-f]`` — the current trainer pod's log.
* ``kubectl fermata tensorboard NAME [--port P] [--print]`` — mirror the run's TensorBoard events
  to a local cache and serve them (``fermata_kubectl.tensorboard_view``), or print the commands.

Installed as the ``kubectl-fermata`` console script, which kubectl finds on ``PATH``. Flags:
``--kubeconfig``, ``--context``, ``-n/--namespace`` (default: the context's namespace).

Where the report's history comes from: the status holds only the latest values, so the loss
curves are read from the run's storage (``spec.storage.checkpoints``, S3 or a path), first the
trainer's TensorBoard event files (``<checkpoints>/tensorboard/``, every logged step; needs the
``tensorboard`` package), else the ``metrics.json`` of the newest checkpoint (every evaluation
and the last training losses). The cost curve is rebuilt from ``status.cost.segments`` (billed
spans with their hourly prices). The plot needs ``matplotlib``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fermata_api import contract, parse_time

GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL
TERMINAL = {"Succeeded", "Failed", "BudgetExceeded", "IdleStopped", "Stopped"}
#: Condition types whose healthy value is "True"; for the others "True" means trouble.
POSITIVE_CONDITIONS = {"Accepted", "PodScheduled", "Progressing", "GatePassed", "Ready"}
#: Conditions that say nothing bad either way.
NEUTRAL_CONDITIONS = {"Complete"}
BAR_WIDTH = 20


class PluginError(Exception):
    """A failure to report to the user (exit code 1), not a crash."""


# ------------------------------------------------------------------------------------- formatting


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds < 600 else f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"


def money(value: Any) -> str:
    return f"${float(value):,.2f}" if isinstance(value, int | float) else "-"


def number(value: Any, digits: int = 4) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, int | float) else "-"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def condition_is_ok(cond: dict[str, Any]) -> bool:
    ctype, value = cond.get("type", ""), cond.get("status")
    if ctype in NEUTRAL_CONDITIONS:
        return True
    if ctype in POSITIVE_CONDITIONS:
        return bool(value == "True")
    return bool(value == "False")


# ---------------------------------------------------------------------------------------- status


Rows = list[tuple[str, str]]


def _head(run: dict[str, Any]) -> str:
    meta, spec, st = run["metadata"], run.get("spec") or {}, run.get("status") or {}
    head = f"{meta['name']} ({meta['namespace']})  {st.get('phase') or 'New'}"
    if st.get("decision"):
        head += f"  {st['decision']}"
    if spec.get("suspend") and st.get("phase") != "Suspended":
        head += "  (suspend requested)"
    return head


def _cost_rows(spec: dict[str, Any], st: dict[str, Any]) -> Rows:
    cost = st.get("cost") or {}
    budget = cost.get("budgetUSD") or (spec.get("budget") or {}).get("maxUSD") or 0.0
    accrued = float(cost.get("accruedUSD") or 0.0)
    share = accrued / budget if budget else 0.0
    text = f"{money(accrued)} of {money(budget)}  {bar(share)} {share * 100:.1f}%"
    if cost.get("hourlyRateUSD"):
        text += f"  {money(cost['hourlyRateUSD'])}/h"
    if cost.get("projectedTotalUSD") is not None:
        text += f"  projected {money(cost['projectedTotalUSD'])}"
    return [("cost", text)]


def _progress_rows(st: dict[str, Any], now: datetime) -> Rows:
    progress = st.get("progress") or {}
    parts = []
    if st.get("progressPercent") is not None:
        parts.append(f"{float(st['progressPercent']):.1f}%")
    if progress:
        parts.append(f"step {progress.get('step', 0)}/{progress.get('totalSteps') or '?'}")
        parts.append(f"epoch {progress.get('epoch', 0)}")
        if progress.get("state"):
            parts.append(str(progress["state"]))
        heartbeat = parse_time(progress.get("heartbeatTime"))
        if heartbeat is not None:
            parts.append(f"reported {human_duration((now - heartbeat).total_seconds())} ago")
    eta = st.get("eta") or {}
    if eta.get("remaining"):
        parts.append(f"ETA {eta['remaining']} ({money(eta.get('remainingCostUSD') or 0.0)} more)")
    rows: Rows = [("progress", "  ".join(parts) if parts else "no report from the trainer yet")]
    if progress:
        loss = f"train {number(progress.get('trainLoss'))}  val {number(progress.get('validationLoss'))}"
        if progress.get("evaluatedStep") is not None:
            loss += f" @ step {progress['evaluatedStep']}"
        if progress.get("baselineValidationLoss") is not None:
            loss += f"  baseline {number(progress['baselineValidationLoss'])}"
        rows += [("loss", loss), ("authenticity", number(progress.get("authenticity"), 3))]
    return rows


def _checkpoint_rows(st: dict[str, Any], now: datetime) -> Rows:
    ckpt = st.get("lastCheckpoint")
    if not ckpt:
        return [("checkpoint", "none yet")]
    when = parse_time(ckpt.get("time"))
    age = f", {human_duration((now - when).total_seconds())} ago" if when else ""
    return [("checkpoint", f"step {ckpt.get('step')}{age}  {ckpt.get('uri')}")]


def _preparation_rows(st: dict[str, Any]) -> Rows:
    """The dataset preparation (status.preparation, status.preparer), when there was one."""
    prep, tracked = st.get("preparation") or {}, st.get("preparer") or {}
    if not prep and not tracked:
        return []
    parts = [str(prep.get("state") or "waiting")]
    if prep.get("filesTotal"):
        parts.append(f"{prep.get('filesDone', 0)}/{prep['filesTotal']} files")
        parts.append(f"tokenized {prep.get('tokenized', 0)}  reused {prep.get('reused', 0)}")
    if prep.get("etaSeconds") is not None and prep.get("state") == "Tokenizing":
        parts.append(f"ETA {human_duration(float(prep['etaSeconds']))}")
    pod = (tracked.get("pod") or {}).get("name") or prep.get("podName")
    if pod:
        parts.append(f"pod {pod}")
    if tracked.get("interruptions") or tracked.get("failures"):
        parts.append(
            f"interruptions {tracked.get('interruptions', 0)}  failures {tracked.get('failures', 0)}"
        )
    return [("preparation", "  ".join(parts))]


def _pod_rows(spec: dict[str, Any], st: dict[str, Any]) -> Rows:
    rows: Rows = []
    pod = st.get("pod")
    if pod:
        where = f" on {pod['nodeName']}" if pod.get("nodeName") else ""
        kind = ", ".join(str(x) for x in (pod.get("instanceType"), pod.get("capacityType")) if x)
        rows.append(
            ("pod", f"{pod['name']}{where}{f' ({kind})' if kind else ''}  {pod.get('phase') or ''}".rstrip())
        )
    spot, failures = spec.get("spot") or {}, spec.get("failures") or {}
    retries = (
        f"interruptions {st.get('interruptions', 0)}/{spot.get('maxInterruptions', '?')}"
        f"  failures {st.get('failures', 0)}/{failures.get('maxRetries', '?')}"
    )
    if st.get("lastInterruption"):
        retries += f"  last: {st['lastInterruption']}"
    return [*rows, ("retries", retries)]


def _decision_rows(st: dict[str, Any]) -> Rows:
    rows: Rows = []
    if st.get("decisionReason"):
        rows.append(("decision", f"{st.get('decision') or '-'}: {st['decisionReason']}"))
    bad = [c for c in st.get("conditions") or [] if not condition_is_ok(c)]
    for i, c in enumerate(bad):
        text = f"{c.get('type')}={c.get('status')} {c.get('reason') or ''}".rstrip()
        if c.get("message"):
            text += f": {c['message']}"
        rows.append(("not OK" if i == 0 else "", text))
    if st.get("message"):
        rows.append(("message", str(st["message"])))
    return rows


def render_status(run: dict[str, Any], now: datetime | None = None) -> str:
    """The compact status block of one run."""
    now = now or datetime.now(UTC)
    spec, st = run.get("spec") or {}, run.get("status") or {}
    rows = [
        *_cost_rows(spec, st),
        *_progress_rows(st, now),
        *_checkpoint_rows(st, now),
        *_preparation_rows(st),
        *_pod_rows(spec, st),
        *_decision_rows(st),
    ]
    return "\n".join([_head(run), *(f"  {label:<13}{text}" for label, text in rows)]) + "\n"


# ---------------------------------------------------------------------------------------- report


def _gate_cell(
    evidence: dict[str, Any], value_key: str, limit_key: str, op: str, fmt: Callable[[Any], str]
) -> str:
    if value_key not in evidence and limit_key not in evidence:
        return "-"
    text = fmt(evidence.get(value_key)) if value_key in evidence else "?"
    if limit_key in evidence:
        text += f" {op} {fmt(evidence[limit_key])}"
    return text


def render_gates(run: dict[str, Any]) -> str:
    """The gate evidence table: outcomes recorded in status, then gates not reached yet."""
    st = run.get("status") or {}
    outcomes = list(st.get("gates") or [])
    header = ("GATE", "DECISION", "WHEN (UTC)", "STEP", "VAL-LOSS (max)", "AUTHENTICITY (min)", "COST (max)")
    rows: list[tuple[str, ...]] = []
    reasons: list[str] = []
    for o in outcomes:
        ev = o.get("evidence") or {}
        when = parse_time(o.get("time"))
        rows.append(
            (
                str(o.get("name")),
                str(o.get("decision")),
                when.strftime("%Y-%m-%d %H:%M") if when else "-",
                str(int(ev["step"])) if isinstance(ev.get("step"), int | float) else "-",
                _gate_cell(ev, "validationLoss", "maxValidationLoss", "<=", lambda v: number(v, 3)),
                _gate_cell(ev, "authenticity", "minAuthenticity", ">=", lambda v: number(v, 3)),
                _gate_cell(ev, "costUSD", "maxCostUSD", "<=", money),
            )
        )
        if o.get("reason"):
            reasons.append(f"  {o.get('name')}: {o['reason']}")
    fired = {str(o.get("name")) for o in outcomes}
    for g in (run.get("spec") or {}).get("gates") or []:
        if g["name"] in fired:
            continue
        at = ", ".join(f"{k} {v}" for k, v in (g.get("at") or {}).items())
        req = g.get("require") or {}
        rows.append(
            (
                g["name"],
                "pending",
                f"at {at}",
                "-",
                number(req["maxValidationLoss"], 3) if "maxValidationLoss" in req else "-",
                number(req["minAuthenticity"], 3) if "minAuthenticity" in req else "-",
                money(req["maxCostUSD"]) if "maxCostUSD" in req else "-",
            )
        )
    if not rows:
        return "Gates: none defined\n"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["Gates"]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if reasons:
        lines.append("Reasons")
        lines.extend(reasons)
    return "\n".join(lines) + "\n"


@dataclass
class History:
    """Series for the report plot; ``source`` says where the losses came from."""

    train: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    authenticity: list[tuple[int, float]] = field(default_factory=list)
    baseline: float | None = None
    cost: list[tuple[datetime, float]] = field(default_factory=list)
    source: str = "status only (latest values)"


def cost_curve(status: dict[str, Any], now: datetime) -> list[tuple[datetime, float]]:
    """Accrued dollars over time from the billed segments (piecewise linear)."""
    cost = status.get("cost") or {}
    spans: list[tuple[datetime, datetime, float]] = []
    updated = parse_time(cost.get("updated")) or now
    for seg in cost.get("segments") or []:
        start = parse_time(seg.get("start"))
        if start is None:
            continue
        end = parse_time(seg.get("end")) or updated
        spans.append((start, max(start, end), float(seg.get("hourlyUSD") or 0.0)))
    if not spans:
        return []
    times = sorted({t for s, e, _ in spans for t in (s, e)})
    curve: list[tuple[datetime, float]] = []
    for t in times:
        usd = sum(rate * (min(t, e) - s).total_seconds() / 3600.0 for s, e, rate in spans if t > s)
        curve.append((t, usd))
    return curve


def _tensorboard_series(storage_uri: str) -> dict[str, list[tuple[int, float]]] | None:
    """Scalars from the trainer's TensorBoard event files under ``<storage>/tensorboard/``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    from fermata_trainer.storage import open_storage

    tb = open_storage(storage_uri).child("tensorboard")
    objects = [o for o in tb.list() if "tfevents" in o.key]
    if not objects:
        return None
    series: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fermata-tb-") as tmp:
        for obj in objects:
            local = tb.local_path(obj.key)
            if local is None:
                local = Path(tmp) / obj.key
                local.parent.mkdir(parents=True, exist_ok=True)
                tb.download_file(obj.key, local)
            acc = EventAccumulator(str(local), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                for ev in acc.Scalars(tag):
                    series.setdefault(tag, {})[int(ev.step)] = float(ev.value)
    return {tag: sorted(points.items()) for tag, points in series.items()}


def _checkpoint_metrics(status: dict[str, Any]) -> dict[str, Any] | None:
    """``metrics.json`` beside the newest checkpoint's manifest."""
    ckpt = status.get("lastCheckpoint") or {}
    uri = ckpt.get("uri")
    if not uri or "/" not in uri:
        return None
    from fermata_trainer.storage import read_uri_bytes

    data: dict[str, Any] = json.loads(read_uri_bytes(uri.rsplit("/", 1)[0] + "/metrics.json"))
    return data


def load_history(
    run: dict[str, Any], now: datetime | None = None, warn: Callable[[str], None] | None = None
) -> History:
    now = now or datetime.now(UTC)
    st = run.get("status") or {}
    progress = st.get("progress") or {}
    hist = History(cost=cost_curve(st, now))
    hist.baseline = progress.get("baselineValidationLoss")
    storage: str | None = ((run.get("spec") or {}).get("storage") or {}).get("checkpoints")
    sources: list[str] = []
    tb: dict[str, list[tuple[int, float]]] | None = None
    if storage:
        try:
            tb = _tensorboard_series(storage)
        except Exception as exc:  # unreachable storage: fall back
            if warn:
                warn(f"TensorBoard events under {storage} not readable: {exc}")
    if tb and storage:
        hist.train = tb.get("train/loss", [])
        hist.validation = tb.get("validation/loss", [])
        hist.authenticity = tb.get("authenticity/score", [])
        sources.append(f"TensorBoard events in {storage.rstrip('/')}/tensorboard/")
    if not hist.validation or not hist.train:
        try:
            metrics = _checkpoint_metrics(st)
        except Exception as exc:
            metrics = None
            if warn:
                warn(f"checkpoint metrics not readable: {exc}")
        if metrics:
            evals = [e for e in metrics.get("evaluations") or [] if not e.get("baseline")]
            if not hist.validation:
                hist.validation = [
                    (int(e["step"]), float(e["validationLoss"]))
                    for e in evals
                    if e.get("validationLoss") is not None
                ]
                hist.authenticity = [
                    (int(e["step"]), float(e["authenticity"]))
                    for e in evals
                    if e.get("authenticity") is not None
                ]
            if not hist.train:
                losses = [float(x) for x in metrics.get("trainLoss") or []]
                last = int(metrics.get("step") or 0)
                hist.train = [(last - len(losses) + 1 + i, x) for i, x in enumerate(losses)]
            if hist.baseline is None:
                hist.baseline = metrics.get("baselineValidationLoss")
            sources.append(f"metrics.json of checkpoint step {metrics.get('step')}")
    if not hist.train and progress.get("trainLoss") is not None:
        hist.train = [(int(progress.get("step") or 0), float(progress["trainLoss"]))]
    if not hist.validation and progress.get("validationLoss") is not None:
        step = progress.get("evaluatedStep", progress.get("step")) or 0
        hist.validation = [(int(step), float(progress["validationLoss"]))]
    if sources:
        hist.source = " + ".join(sources)
    return hist


def plot_report(run: dict[str, Any], hist: History, out: Path) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise PluginError("the report plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    meta, spec = run["metadata"], run.get("spec") or {}
    st = run.get("status") or {}
    fig, (ax_loss, ax_cost) = plt.subplots(2, 1, figsize=(9, 7.5), constrained_layout=True)
    fig.suptitle(
        f"TrainingRun {meta['namespace']}/{meta['name']} — {st.get('phase') or 'New'}"
        + (f", {st['decision']}" if st.get("decision") else "")
    )

    if hist.train:
        ax_loss.plot(*zip(*hist.train, strict=True), color="tab:blue", linewidth=1.0, label="train loss")
    if hist.validation:
        ax_loss.plot(
            *zip(*hist.validation, strict=True), color="tab:orange", marker="o", label="validation loss"
        )
    if hist.baseline is not None:
        ax_loss.axhline(
            float(hist.baseline), color="tab:gray", linestyle="--", linewidth=1, label="baseline (step 0)"
        )
    for g in spec.get("gates") or []:
        limit = (g.get("require") or {}).get("maxValidationLoss")
        if limit is not None:
            ax_loss.axhline(
                float(limit), color="tab:red", linestyle=":", linewidth=1, label=f"gate {g['name']} max"
            )
    if hist.authenticity:
        ax_auth = ax_loss.twinx()
        ax_auth.plot(
            *zip(*hist.authenticity, strict=True), color="tab:green", marker="s", label="authenticity"
        )
        ax_auth.set_ylabel("authenticity (0-1)")
        ax_auth.set_ylim(0, 1)
        ax_auth.legend(loc="lower left", fontsize="small")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title(f"Loss ({hist.source})", fontsize="small")
    if hist.train or hist.validation:
        ax_loss.legend(loc="upper right", fontsize="small")
    else:
        ax_loss.text(0.5, 0.5, "no loss history yet", ha="center", va="center", transform=ax_loss.transAxes)

    budget = float((spec.get("budget") or {}).get("maxUSD") or 0.0)
    warn_at = float((spec.get("budget") or {}).get("warnAtFraction") or 0.8)
    if hist.cost:
        times, usd = zip(*hist.cost, strict=True)
        ax_cost.plot(list(times), list(usd), color="tab:purple", marker=".", label="accrued")
    if budget:
        ax_cost.axhline(budget, color="tab:red", linewidth=1, label=f"budget {money(budget)}")
        ax_cost.axhline(
            budget * warn_at,
            color="tab:orange",
            linestyle="--",
            linewidth=1,
            label=f"warning at {warn_at:.0%}",
        )
    projected = (st.get("cost") or {}).get("projectedTotalUSD")
    if projected is not None:
        ax_cost.axhline(
            float(projected),
            color="tab:gray",
            linestyle=":",
            linewidth=1,
            label=f"projected {money(projected)}",
        )
    ax_cost.set_ylabel("US dollars")
    ax_cost.set_xlabel("time (UTC)")
    ax_cost.set_title("Cost (from status.cost.segments)", fontsize="small")
    ax_cost.legend(loc="upper left", fontsize="small")
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax_cost.xaxis.set_major_locator(locator)
    ax_cost.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    fig.savefig(out, dpi=100)
    plt.close(fig)


def render_report(run: dict[str, Any], hist: History, out: Path | None) -> str:
    st = run.get("status") or {}
    meta = run["metadata"]
    lines = [
        f"{meta['name']} ({meta['namespace']})  {st.get('phase') or 'New'}"
        + (f"  decision {st['decision']}" if st.get("decision") else "")
    ]
    text = "\n".join(lines) + "\n" + render_gates(run)
    text += (
        f"History: losses from {hist.source}: {len(hist.train)} train points, "
        f"{len(hist.validation)} evaluations; cost from {len((st.get('cost') or {}).get('segments') or [])} "
        "billed segments\n"
    )
    if out is not None:
        text += f"Plot: {out}\n"
    return text


# ---------------------------------------------------------------------------------------- the API


@dataclass
class Cluster:
    api: Any
    namespace: str

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def get_run(self, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            run: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise PluginError(f'trainingrun "{name}" not found in namespace "{self.namespace}"') from exc
            raise PluginError(
                f"reading trainingrun {self.namespace}/{name}: {exc.status} {exc.reason}"
            ) from exc
        return run

    def set_suspend(self, name: str, value: bool) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        self.get_run(name)  # a readable "not found"
        try:
            run: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"suspend": value}}
            )
        except ApiException as exc:
            raise PluginError(
                f"patching {self.namespace}/{name}: {exc.status} {exc.reason}: {exc.body}"
            ) from exc
        return run

    def trainer_pod(self, run: dict[str, Any]) -> str:
        """The current trainer pod: status.pod, else the newest pod labelled with the run."""
        pod = ((run.get("status") or {}).get("pod") or {}).get("name")
        if pod:
            return str(pod)
        name = run["metadata"]["name"]
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"fermata.dev/run={name}").items
        if not pods:
            raise PluginError(f"trainingrun {self.namespace}/{name} has no trainer pod")
        newest = max(pods, key=lambda p: int((p.metadata.labels or {}).get("fermata.dev/incarnation", "0")))
        return str(newest.metadata.name)

    def logs(self, run: dict[str, Any], tail: int | None, follow: bool, previous: bool, out: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        pod = self.trainer_pod(run)
        kwargs: dict[str, Any] = {"container": "trainer", "previous": previous}
        if tail is not None:
            kwargs["tail_lines"] = tail
        try:
            if follow:
                resp = self.core.read_namespaced_pod_log(
                    pod, self.namespace, follow=True, _preload_content=False, **kwargs
                )
                for chunk in resp.stream():
                    out.write(chunk.decode(errors="replace"))
                    out.flush()
                return
            text = self.core.read_namespaced_pod_log(pod, self.namespace, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                phase = (run.get("status") or {}).get("phase") or "New"
                raise PluginError(
                    f"trainer pod {self.namespace}/{pod} is gone (run {run['metadata']['name']} is {phase})"
                ) from exc
            detail = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                detail = json.loads(detail).get("message", detail)
            raise PluginError(
                f"logs of pod {self.namespace}/{pod}: {exc.status} {exc.reason}: {detail}"
            ) from exc
        out.write(text if text.endswith("\n") or not text else text + "\n")


def connect(kubeconfig: str | None, context: str | None, namespace: str | None) -> Cluster:
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    except (config.ConfigException, FileNotFoundError, OSError) as exc:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            raise PluginError(f"no usable kubeconfig: {exc}") from exc
    if namespace is None:
        namespace = "default"
        try:
            contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), current) if context else current
            namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
        except (config.ConfigException, FileNotFoundError, OSError):
            pass
    return Cluster(api=client.ApiClient(cfg), namespace=namespace)


# ------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace of the run (default: the context's)")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context")
    parser = argparse.ArgumentParser(
        prog="kubectl fermata", description="Look at and steer Fermata TrainingRuns.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", parents=[common], help="phase, cost vs budget, progress, losses, checkpoint")
    p.add_argument("name")
    p = sub.add_parser("report", parents=[common], help="gate evidence table and a PNG of loss and cost")
    p.add_argument("name")
    p.add_argument("-o", "--output", type=Path, help="PNG to write (default: <name>-report.png)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    for verb, text in (
        ("suspend", "checkpoint, release the GPU and wait"),
        ("resume", "continue from the last checkpoint"),
    ):
        p = sub.add_parser(verb, parents=[common], help=text)
        p.add_argument("name")
    p = sub.add_parser("logs", parents=[common], help="the current trainer pod's log")
    p.add_argument("name")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="stream the log")
    p.add_argument("-p", "--previous", action="store_true", help="the previous container instance's log")
    _tensorboard_parser(sub, common)
    return parser


def _tensorboard_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from fermata_kubectl import tensorboard_view as tb

    p = sub.add_parser(
        "tensorboard",
        parents=[common],
        help="mirror the run's TensorBoard events locally and serve them",
        description=(
            "Mirror <spec.storage.checkpoints>/tensorboard/ into a local cache (incrementally, again "
            "every --refresh seconds) and serve it with TensorBoard on 127.0.0.1. S3 is read with "
            "YOUR OWN AWS environment (AWS_PROFILE, AWS_ACCESS_KEY_ID..., SSO, AWS_ENDPOINT_URL_S3), "
            "not with the run's spec.storage.credentialsSecret."
        ),
    )
    p.add_argument("name")
    p.add_argument("--port", type=int, default=tb.DEFAULT_PORT, help=f"default {tb.DEFAULT_PORT}")
    p.add_argument("--print", action="store_true", help="print the sync and serve commands instead")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="local mirror (default: ~/.cache/fermata/tensorboard)"
    )
    p.add_argument(
        "--refresh",
        type=float,
        default=tb.DEFAULT_REFRESH_SECONDS,
        help=f"seconds between syncs while serving (0: once; default {tb.DEFAULT_REFRESH_SECONDS:g})",
    )


def _tensorboard(run: dict[str, Any], args: argparse.Namespace, out: Any, err: Any) -> int:
    from fermata_kubectl import tensorboard_view as tb

    view = tb.run_view(run, args.cache_dir or tb.default_cache_dir())
    if args.print:
        out.write(tb.render_commands(view, args.port))
        return 0
    return tb.serve(view, args.port, args.refresh, out, err)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out, err = sys.stdout, sys.stderr
    try:
        cluster = connect(args.kubeconfig or None, args.context, args.namespace)
        run = cluster.get_run(args.name)
        if args.command == "status":
            out.write(render_status(run))
        elif args.command == "report":

            def warn(message: str) -> None:
                err.write(f"warning: {message}\n")

            hist = load_history(run, warn=warn)
            target = None if args.no_plot else (args.output or Path(f"{args.name}-report.png"))
            if target is not None:
                plot_report(run, hist, target)
            out.write(render_report(run, hist, target))
        elif args.command in ("suspend", "resume"):
            want = args.command == "suspend"
            phase = (run.get("status") or {}).get("phase")
            if phase in TERMINAL:
                raise PluginError(f"trainingrun {cluster.namespace}/{args.name} has ended ({phase})")
            if bool((run.get("spec") or {}).get("suspend")) == want:
                out.write(
                    f"trainingrun {cluster.namespace}/{args.name} already {'suspended' if want else 'running'}"
                    f" (spec.suspend={str(want).lower()})\n"
                )
                return 0
            cluster.set_suspend(args.name, want)
            out.write(
                f"trainingrun {cluster.namespace}/{args.name} "
                + (
                    "suspend requested: the trainer checkpoints, then the GPU is released\n"
                    if want
                    else "resume requested: a new pod continues from the last verified checkpoint\n"
                )
            )
        elif args.command == "logs":
            cluster.logs(run, args.tail, args.follow, args.previous, out)
        elif args.command == "tensorboard":
            return _tensorboard(run, args, out, err)
        return 0
    except PluginError as exc:
        err.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _main_entry() -> None:  # pragma: no cover - python -m
    os.environ.setdefault("MPLBACKEND", "Agg")
    raise SystemExit(main())


if __name__ == "__main__":
    _main_entry()
