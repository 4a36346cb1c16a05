"""Shared fixtures.  Imports stay inside fixtures so no reactor is installed at collection."""

from __future__ import annotations

import os

import pytest


def require(tool_ok: bool, why: str) -> None:
    """Skip when a tool is missing, except under JANO_REQUIRE_ALL (CI), where it fails."""
    if tool_ok:
        return
    if os.environ.get("JANO_REQUIRE_ALL"):
        pytest.fail(f"required for this test and missing: {why}")
    pytest.skip(why)
