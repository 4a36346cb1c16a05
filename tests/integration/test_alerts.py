"""
The shipped alerting rules (etc/prometheus/alerts.yml) pass promtool's checks
and their unit tests (etc/prometheus/alerts.test.yml), and use only metrics
Jano exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import require
from procs import ROOT

pytestmark = pytest.mark.integration

RULES_DIR = ROOT / "etc" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (Debian package prometheus) is not installed")
    assert promtool is not None
    # From the rules' directory, so the test file's relative rule_files resolve.
    return subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True,
                          timeout=120)


def test_alert_rules_pass_promtool_check() -> None:
    res = _promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_rule_unit_tests_pass() -> None:
    res = _promtool("test", "rules", "alerts.test.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_rules_use_only_metrics_jano_exports() -> None:
    """A misspelt metric makes a rule that never fires; every name must be in jano/'s source."""
    used = set(re.findall(r"\bjano_[a-z_]+", (RULES_DIR / "alerts.yml").read_text()))
    assert len(used) >= 9, used
    source = "\n".join(p.read_text() for p in (ROOT / "jano").rglob("*.py"))
    # prometheus_client appends _total to a counter declared without it.
    missing = {name for name in used
               if f'"{name}"' not in source and f'"{name.removesuffix("_total")}"' not in source}
    assert not missing, f"alerts.yml uses metrics Jano does not export: {sorted(missing)}"
