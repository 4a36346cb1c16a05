"""Shared fixtures.  Imports stay inside fixtures so no reactor is installed at collection."""

from __future__ import annotations

import gc
import os
from typing import Any, Iterator

import pytest


def require(tool_ok: bool, why: str) -> None:
    """Skip when a tool is missing, except under JANO_REQUIRE_ALL (CI), where it fails."""
    if tool_ok:
        return
    if os.environ.get("JANO_REQUIRE_ALL"):
        pytest.fail(f"required for this test and missing: {why}")
    pytest.skip(why)


@pytest.fixture(autouse=True, scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run records (``processes.runs_dir``'s default) go to a folder of the test session's."""
    saved = {k: os.environ.get(k) for k in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR")}
    os.environ.pop("RUNTIME_DIRECTORY", None)
    os.environ["XDG_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "logs_errors: the test expects Twisted to log errors (the error observer "
                   "lets them pass)")


@pytest.fixture(autouse=True)
def error_observer(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    """
    Fail any test during which Twisted logged an unhandled error (a failure
    logged with ``log.failure``/``log.err``, or a Deferred garbage-collected
    with an unhandled error), unless it is marked ``logs_errors``.
    """
    from twisted.logger import globalLogPublisher

    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    try:
        yield errors
        gc.collect()  # unhandled errors in Deferreds are reported when collected
    finally:
        globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]
    if errors and request.node.get_closest_marker("logs_errors") is None:
        from twisted.logger import formatEvent

        lines = []
        for e in errors[:3]:
            failure = e.get("log_failure")
            lines.append(formatEvent(e) + ("\n" + failure.getTraceback() if failure else ""))
        pytest.fail("Twisted logged an unhandled error:\n" + "\n".join(lines), pytrace=False)
