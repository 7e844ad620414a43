"""The layout is the architecture: small planner and policy functions, and a stated overshoot
bound that agrees with what the chart configures. (Import contracts: `lint-imports` in `make lint`.)"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from fermata_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def _functions(folder: Path) -> list[tuple[str, int]]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                found.append((f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1))
    return found


def test_planner_and_policy_functions_stay_small() -> None:
    pkg = ROOT / "operator" / "fermata_operator"
    functions = _functions(pkg / "planner") + _functions(pkg / "policies")
    assert len(functions) > 40  # the folders are where they should be
    too_long = [(name, n) for name, n in functions if n > MAX_FUNCTION_LINES]
    assert too_long == []


def test_chart_timeout_matches_the_operator_default_and_the_readme() -> None:
    values = yaml.safe_load((ROOT / "charts" / "fermata" / "values.yaml").read_text())
    chart = float(values["operator"]["checkpointRequestTimeoutSeconds"])
    assert chart == OperatorSettings().checkpoint_request_timeout_seconds
    readme = (ROOT / "README.md").read_text()
    assert f"both default to {chart:.0f} s" in readme


def test_chart_first_status_hold_matches_the_operator_default() -> None:
    values = yaml.safe_load((ROOT / "charts" / "fermata" / "values.yaml").read_text())
    assert float(values["operator"]["firstStatusHoldSeconds"]) == OperatorSettings().first_status_hold_seconds
