"""The ``fermata`` command: run the operator and print the CRDs.

* ``fermata operator [-n NS ...] [--peering NAME]`` — run the operator (kopf).
* ``fermata crds`` — print the CRD YAML.

Other packages add subcommands through the ``fermata.commands`` entry-point group: each entry
point is a function called with the subparsers (``register(subparsers)``) that adds its own
parser and sets ``func`` (``args -> exit code``). In a checkout, the development package
(``dev/``) adds ``fermata local up|down|status`` that way; the images carry no plugin.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from importlib.metadata import entry_points
from typing import Any

#: Entry-point group of CLI plugins (see the module docstring).
COMMANDS_GROUP = "fermata.commands"


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from fermata_operator import handlers  # noqa: F401 - registers the handlers
    from fermata_operator.logging_setup import configure

    configure()
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority if args.priority is not None else peering_priority(),
        namespaces=args.namespace or (),
        clusterwide=not args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


def peering_priority() -> int:
    """A replica's kopf peering priority when none is given: random, so that of several peered
    replicas exactly one acts. (kopf pauses *every* operator that sees a live peer of its own
    priority: replicas that all kept the default 0 would all stand by and none would act.)"""
    return 1 + secrets.randbelow(2**31 - 1)


def _crds(_: argparse.Namespace) -> int:
    from fermata_operator.crdgen import render

    sys.stdout.write(render())
    return 0


def _add_plugins(sub: argparse._SubParsersAction[Any]) -> None:
    """Let every ``fermata.commands`` entry point add its subcommands; a broken plugin is
    reported and skipped, so it can never stop ``fermata operator``."""
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:
            print(f"fermata: skipping command plugin {ep.name} ({ep.value}): {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fermata", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    op = sub.add_parser("operator", help="run the operator")
    op.add_argument("-n", "--namespace", action="append", help="watch only this namespace (repeatable)")
    op.add_argument("--peering", default=None, help="kopf peering name for HA (default: standalone)")
    op.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    op.add_argument(
        "--priority",
        type=int,
        default=None,
        help="kopf peering priority: of the live peers the highest acts, the others stand by "
        "(default: random, distinct per replica)",
    )
    op.set_defaults(func=_operator)
    crds = sub.add_parser("crds", help="print the TrainingRun CRD")
    crds.set_defaults(func=_crds)
    _add_plugins(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
