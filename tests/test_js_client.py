"""The browser client's own unit tests, run with Node's built-in test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CLIENTS = Path(__file__).resolve().parent.parent / "clients"


def test_js_client_unit_tests_pass() -> None:
    """`node --test clients/test/` passes: word lookup, message handling, reconnection."""
    node = shutil.which("node")
    assert node is not None, "Node.js is needed for the browser client's tests"
    result = subprocess.run(
        [node, "--test", str(CLIENTS / "test")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass " in result.stdout
