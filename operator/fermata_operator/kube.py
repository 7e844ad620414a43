"""Kubernetes client configuration (kubeconfig, or in-cluster service account)."""

from __future__ import annotations

import os
from importlib import metadata

from kubernetes import client, config


def user_agent() -> str:
    """``fermata-operator/<version>``: tells the operator's requests apart in audit logs."""
    try:
        version = metadata.version("fermata")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        version = "dev"
    return f"fermata-operator/{version}"


def _configured(cfg: client.Configuration, pool_size: int | None) -> client.ApiClient:
    if pool_size:
        cfg.connection_pool_maxsize = pool_size
    api = client.ApiClient(cfg)
    api.user_agent = user_agent()
    return api


def api_client(kubeconfig: str | None = None, pool_size: int | None = None) -> client.ApiClient:
    """A client for the operator; ``pool_size`` connections may be open at once."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        cfg = client.Configuration()
        config.load_kube_config(config_file=path, client_configuration=cfg)
        return _configured(cfg, pool_size)
    try:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return _configured(cfg, pool_size)
    except config.ConfigException:
        cfg = client.Configuration()
        config.load_kube_config(client_configuration=cfg)
        return _configured(cfg, pool_size)
