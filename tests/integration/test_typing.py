"""``mypy --strict`` over jano/ and tests/ (settings in setup.cfg) stays clean."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import require
from procs import ROOT

pytestmark = pytest.mark.integration


def test_mypy_strict_is_clean() -> None:
    require(importlib.util.find_spec("mypy") is not None and importlib.util.find_spec("mypy_zope") is not None,
            "mypy and mypy-zope are not installed (pip install '.[test]')")
    res = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:]
