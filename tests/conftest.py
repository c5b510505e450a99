"""
pytest runs the same trial TestCases that C{trial tests} runs; like trial,
run each test in a scratch working directory so C{mktemp()} and stray files
land there, not in the checkout.

Write reactor tests as trial TestCases, not C{pytest_twisted.inlineCallbacks}
functions: once such a function has started pytest-twisted's reactor
greenlet, every trial TestCase collected after it fails to spin the reactor.
"""

import pytest


@pytest.fixture(autouse=True)
def _scratch_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
