"""``python -m fermata_operator`` runs the operator (same as ``fermata operator``)."""

from fermata_operator.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["operator", *__import__("sys").argv[1:]]))
