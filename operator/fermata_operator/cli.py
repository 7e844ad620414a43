"""The ``fermata`` command: run the operator, print the CRDs, and the local mode.

* ``fermata operator [-n NS ...] [--peering NAME]`` — run the operator (kopf).
* ``fermata crds`` — print the CRD YAML.
* ``fermata local up|down|status`` — a local control plane + fake GPU nodes + operator.
"""

from __future__ import annotations

import argparse
import sys


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from fermata_operator import handlers  # noqa: F401 - registers the handlers
    from fermata_operator.logging_setup import configure

    configure()
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        namespaces=args.namespace or (),
        clusterwide=not args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


def _crds(_: argparse.Namespace) -> int:
    from fermata_operator.crdgen import render

    sys.stdout.write(render())
    return 0


def _local(args: argparse.Namespace) -> int:
    from fermata_operator.local import mode

    if args.action == "up":
        return mode.up()
    if args.action == "down":
        return mode.down()
    return mode.status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fermata", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    op = sub.add_parser("operator", help="run the operator")
    op.add_argument("-n", "--namespace", action="append", help="watch only this namespace (repeatable)")
    op.add_argument("--peering", default=None, help="kopf peering name for HA (default: standalone)")
    op.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    op.set_defaults(func=_operator)
    crds = sub.add_parser("crds", help="print the TrainingRun CRD")
    crds.set_defaults(func=_crds)
    local = sub.add_parser("local", help="local control plane, fake GPU nodes and the operator")
    local.add_argument("action", choices=["up", "down", "status"])
    local.set_defaults(func=_local)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
