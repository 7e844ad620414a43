"""``fermata local up|down|status``: a subcommand the product CLI discovers as a plugin.

``dev/pyproject.toml`` registers :func:`register` in the ``fermata.commands`` entry-point group;
``fermata_operator.cli`` calls every function in that group with its subparsers. This module
stays import-light: local mode itself is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def _local(args: argparse.Namespace) -> int:
    from fermata_dev import local_mode

    if args.action == "up":
        return local_mode.up()
    if args.action == "down":
        return local_mode.down()
    return local_mode.status()


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``local`` to the ``fermata`` command."""
    local = subparsers.add_parser("local", help="local control plane, fake GPU nodes and the operator")
    local.add_argument("action", choices=["up", "down", "status"])
    local.set_defaults(func=_local)
