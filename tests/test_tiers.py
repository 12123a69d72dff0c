"""Every collected test is in exactly one tier (unit, integration, e2e), as tests/conftest.py sets them.

One collection of the whole suite in a subprocess (nothing runs), selecting the tests with no tier
or with more than one; and a check that each entry of conftest's TIER_TABLE still names a test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NO_TIER = "not unit and not integration and not e2e"
TWO_TIERS = "(unit and integration) or (unit and e2e) or (integration and e2e)"


def collect(markexpr: str) -> list[str]:
    """Node ids that `pytest --collect-only -m markexpr` selects."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", markexpr],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # 0: some selected; 5: none selected. Anything else is a collection error, which would hide tests.
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_every_test_has_exactly_one_tier() -> None:
    wrong = collect(f"({NO_TIER}) or {TWO_TIERS}")
    assert wrong == [], f"tests with no tier or more than one (see TIER_TABLE in tests/conftest.py): {wrong}"


def test_tier_table_names_only_tests_that_exist(pytestconfig: pytest.Config) -> None:
    # The loaded conftest, not a second import of it (its body sets up the session's workspace).
    conftest = pytestconfig.pluginmanager.get_plugin(str(TESTS / "conftest.py"))
    assert conftest is not None, "tests/conftest.py is not loaded"
    for key in conftest.TIER_TABLE:
        path, _, name = key.partition("::")
        assert (TESTS / path).is_file(), f"TIER_TABLE: {path} is gone"
        if name:
            source = (TESTS / path).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"TIER_TABLE: no test {key}"
