"""The browser client's own unit tests, run with Node's built-in test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CLIENTS = Path(__file__).resolve().parent.parent / "clients"


def test_js_client_unit_tests_pass() -> None:
    """`node --test clients/test/` passes: word lookup, message handling, reconnection,
    and the resume of a dropped connection (on a fake socket and fake timers)."""
    node = shutil.which("node")
    assert node is not None, "Node.js is needed for the browser client's tests"
    result = subprocess.run(
        [node, "--test", str(CLIENTS / "test")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass " in result.stdout
    # The resume's tests ran (a file that failed to load would run none of them).
    for name in (
        "a dropped connection is resumed: the rest of the audio and words, nothing twice",
        "attempts back off from 0.25 s to 5 s, and give up at the server's window",
        "a refused resume fails them with resume_failed; the connection goes on as a new one",
    ):
        assert any(
            line.startswith("ok ") and line.endswith(f" - {name}")
            for line in result.stdout.splitlines()
        ), name
