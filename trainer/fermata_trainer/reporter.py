"""Reporting progress to the TrainingRun (``status.progress`` / ``status.lastCheckpoint``).

:class:`KubernetesStatusReporter` server-side-applies :meth:`TrainerStatus.apply_body` to the
``status`` subresource under the field manager ``fermata-trainer`` (``force=true``) and returns
the API's answer, from which the trainer reads ``status.control`` (see
:func:`~fermata_api.contract.read_control`). :class:`NullReporter` only logs, for runs
outside Kubernetes. Reporting errors are logged and swallowed: the next heartbeat retries, and
training never stops because the API server is unreachable.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Protocol

from fermata_api import (
    API_GROUP,
    API_VERSION,
    PLURAL,
    TRAINER_FIELD_MANAGER,
    PreparationStatus,
    RunRef,
    TrainerStatus,
)
from fermata_trainer.logging_setup import get_logger

log = get_logger(__name__)

APPLY_PATCH_CONTENT_TYPE = "application/apply-patch+yaml"


class StatusReporter(Protocol):
    """Where the trainer's status goes."""

    def report(self, status: TrainerStatus | PreparationStatus) -> dict[str, Any] | None:
        """Send ``status``; return the updated TrainingRun object when there is one."""
        ...

    def close(self) -> None: ...


class NullReporter:
    """Local runs: each report is a log line, and there is never a control block."""

    def __init__(self) -> None:
        self.reports = 0

    def report(self, status: TrainerStatus | PreparationStatus) -> dict[str, Any] | None:
        self.reports += 1
        if isinstance(status, PreparationStatus):
            prep = status.preparation
            log.info(
                "preparation_status",
                state=prep.state.value,
                files_done=prep.files_done,
                files_total=prep.files_total,
                tokenized=prep.tokenized,
                reused=prep.reused,
                eta_seconds=prep.eta_seconds,
                codes_key=prep.codes_key,
            )
            return None
        progress = status.progress
        log.info(
            "status",
            state=progress.state.value,
            step=progress.step,
            total_steps=progress.total_steps,
            epoch=progress.epoch,
            train_loss=progress.train_loss,
            validation_loss=progress.validation_loss,
            authenticity=progress.authenticity,
            last_checkpoint=status.last_checkpoint.uri if status.last_checkpoint else None,
            best_export=status.artifacts.best.uri if status.artifacts and status.artifacts.best else None,
            final_export=status.artifacts.final.uri if status.artifacts and status.artifacts.final else None,
        )
        return None

    def close(self) -> None:
        return None


def status_path(namespace: str, name: str) -> str:
    return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


def load_api_client() -> Any:
    """An ApiClient from the pod's service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None,
            client_configuration=configuration,
        )
    return client.ApiClient(configuration)


class KubernetesStatusReporter:
    """Server-side apply of the trainer's status to its TrainingRun."""

    def __init__(
        self,
        run: RunRef,
        api_client: Any | None = None,
        request_timeout: tuple[float, float] = (5.0, 20.0),
        field_manager: str = TRAINER_FIELD_MANAGER,
    ) -> None:
        if not run.name:
            raise ValueError("KubernetesStatusReporter needs run.name")
        self.run = run
        #: the preparation pod applies status.preparation under its own field manager
        self.field_manager = field_manager
        # loaded on first use, so a missing kubeconfig is retried at every heartbeat instead
        # of stopping the trainer
        self._api_client = api_client
        self.request_timeout = request_timeout
        self.path = status_path(run.namespace, run.name)
        self.failures = 0

    def body(self, status: TrainerStatus | PreparationStatus) -> dict[str, Any]:
        body = status.apply_body()
        metadata: dict[str, Any] = {"name": self.run.name, "namespace": self.run.namespace}
        if self.run.uid:
            # a TrainingRun deleted and re-created under the same name is not ours to update
            metadata["uid"] = self.run.uid
        body["metadata"] = metadata
        return body

    @property
    def api_client(self) -> Any:
        if self._api_client is None:
            self._api_client = load_api_client()
        return self._api_client

    def apply(self, status: TrainerStatus | PreparationStatus) -> dict[str, Any]:
        """The raw apply call (raises on API errors)."""
        response = self.api_client.call_api(
            self.path,
            "PATCH",
            path_params={},
            query_params=[("fieldManager", self.field_manager), ("force", "true")],
            header_params={
                "Content-Type": APPLY_PATCH_CONTENT_TYPE,
                "Accept": "application/json",
            },
            body=self.body(status),
            response_type="object",
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _preload_content=True,
            _request_timeout=self.request_timeout,
        )
        return response if isinstance(response, dict) else {}

    def report(self, status: TrainerStatus | PreparationStatus) -> dict[str, Any] | None:
        try:
            response = self.apply(status)
        except Exception as exc:
            self.failures += 1
            log.warning(
                "status_report_failed",
                run=f"{self.run.namespace}/{self.run.name}",
                failures=self.failures,
                error=describe_error(exc),
            )
            return None
        if self.failures:
            log.info("status_report_recovered", after_failures=self.failures)
        self.failures = 0
        return response

    def close(self) -> None:
        if self._api_client is None:
            return
        with contextlib.suppress(Exception):
            self._api_client.close()


def describe_error(exc: Exception) -> str:
    """A short, readable error: the API's own message for API errors, not the HTTP headers."""
    body = getattr(exc, "body", None)
    status = getattr(exc, "status", None)
    if body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return f"HTTP {status}: {message}"[:800]
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def make_reporter(run: RunRef, field_manager: str = TRAINER_FIELD_MANAGER) -> StatusReporter:
    """Kubernetes reporting when the config names a TrainingRun, else logs only."""
    if not run.name:
        return NullReporter()
    return KubernetesStatusReporter(run, field_manager=field_manager)
