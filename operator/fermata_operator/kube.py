"""Kubernetes client configuration (kubeconfig, or in-cluster service account)."""

from __future__ import annotations

import os

from kubernetes import client, config


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        cfg = client.Configuration()
        config.load_kube_config(config_file=path, client_configuration=cfg)
        return client.ApiClient(cfg)
    try:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    except config.ConfigException:
        cfg = client.Configuration()
        config.load_kube_config(client_configuration=cfg)
        return client.ApiClient(cfg)
