"""The chart's alert rules: promtool checks them and runs their unit tests (tests/promtool/).

promtool comes from Debian's `prometheus` package (`apt-get install -y prometheus`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from fermata_operator import metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "charts" / "fermata" / "files" / "alerts.yaml"
UNIT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed: `apt-get install -y prometheus` (Debian) provides it")
    return path


def _run(*args: str) -> str:
    proc = subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_promtool_check_rules() -> None:
    out = _run("check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_promtool_unit_tests() -> None:
    out = _run("test", "rules", str(UNIT_TESTS))
    assert "SUCCESS" in out


def _exported_series() -> set[str]:
    """Every sample name the operator's metrics module exposes (counters with _total, ...)."""
    assert metrics.COST_USD is not None  # imported for its registrations
    names: set[str] = set()
    for collector in list(REGISTRY._collector_to_names):
        for family in collector.describe() if hasattr(collector, "describe") else []:
            if family.name.startswith("fermata_"):
                base = family.name
                names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_count", f"{base}_sum"}
    return names


def test_rules_use_only_series_the_operator_exports() -> None:
    exported = _exported_series()
    assert "fermata_run_phase" in exported and "fermata_reconcile_errors_total" in exported
    groups = yaml.safe_load(RULES.read_text())["groups"]
    used: set[str] = set()
    for group in groups:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bfermata_[a-z_]+", rule["expr"]))
    assert used, "no fermata_* series in the rules"
    assert used <= exported, f"unknown series: {sorted(used - exported)}"
    unit = UNIT_TESTS.read_text()
    series_in_tests = set(re.findall(r"series: '(fermata_[a-z_]+)", unit))
    assert series_in_tests <= exported, f"unknown series in unit tests: {sorted(series_in_tests - exported)}"
    assert used <= series_in_tests, f"rules without unit-test input: {sorted(used - series_in_tests)}"
