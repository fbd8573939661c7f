"""The documentation stays true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import ttsstream.exceptions as exceptions
from ttsstream.config import _VARIABLES

ROOT = Path(__file__).resolve().parent.parent


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the Quickstart's test command."""
    quickstart = read("README.md").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.+?)\n```", quickstart)
    assert len(commands) >= 2
    install_and_serve, install_and_test = commands[0], commands[1]
    assert "ttsstream serve" in install_and_serve
    assert "pytest" in install_and_test
    assert install_and_test in read(".ci/run").splitlines()


def test_every_variable_is_documented() -> None:
    """Each configuration variable is in the README table and in .env.example."""
    readme, example = read("README.md"), read(".env.example")
    for variable in _VARIABLES:
        assert f"| `{variable}` |" in readme, variable
        assert re.search(rf"^# {variable}=", example, re.MULTILINE), variable


def test_every_error_code_is_documented() -> None:
    """Each wire error code has a row in docs/protocol.md."""
    protocol = read("docs/protocol.md")
    codes = {
        cls.code
        for cls in vars(exceptions).values()
        if isinstance(cls, type) and issubclass(cls, exceptions.ClientError)
    }
    assert "queue_full" in codes and "internal" in codes
    # In the table itself: its rows run from its header to the first line that is
    # not a row (a row after a paragraph would render as text).
    table = protocol.split("## Error codes", 1)[1].split("| code | when |", 1)[1]
    rows = table.split("\n\n", 1)[0]
    for code in codes:
        assert f"\n| `{code}` |" in rows, code


def test_readme_quotes_the_latest_benchmark() -> None:
    """The README's Performance section is bench/results.md as the last run wrote it."""
    results = read("bench/results.md").strip()
    performance = read("README.md").split("## Performance", 1)[1].split("\n## ", 1)[0]
    assert results.startswith("Run ") and results in performance
