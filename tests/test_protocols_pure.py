"""The layers hold: every WebSocket protocol is sans-I/O in fact (importing it loads
nothing that does I/O), and the lower layers import nothing above them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ttsstream

#: Modules that do I/O (or load the engines, which do): no protocol may import them.
IO_MODULES = ("asyncio", "socket", "av", "aiohttp", "edge_tts", "websockets", "redis")

PROTOCOLS = [
    "ttsstream.protocols.actions",
    "ttsstream.protocols.elevenlabs",
    "ttsstream.protocols.v1",
    "ttsstream.protocols.cartesia",
]


@pytest.mark.parametrize("module", PROTOCOLS)
def test_a_protocol_imports_nothing_that_does_io(module: str) -> None:
    probe = f"import sys, {module}\nprint(','.join(m for m in {IO_MODULES!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"{module} loads {loaded}"


#: The layers above the core: nothing below them may import them (arrows point down).
UPPER = ("cluster", "http", "ws", "server", "services", "routes", "doors", "port", "cli")
LOWER = ("core", "cache", "engines", "audio", "protocols")


def _imports(path: Path) -> set[str]:
    """The ``ttsstream`` modules a source file imports (at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("ttsstream.")}


def test_the_lower_layers_import_nothing_above_them() -> None:
    """core, cache, engines, audio and protocols never import the doors, the cluster or
    the composition root (no package cycle: the cluster implements what core defines)."""
    package = Path(ttsstream.__file__).parent
    wrong = []
    for layer in LOWER:
        for path in sorted((package / layer).glob("*.py")):
            for name in _imports(path):
                if name.split(".")[1] in UPPER:
                    wrong.append(f"{path.relative_to(package)} imports {name}")
    assert wrong == []


def test_the_configuration_imports_nothing_of_the_server() -> None:
    """config.py reads settings; it imports no other part of the server but its errors."""
    path = Path(ttsstream.__file__).parent / "config.py"
    assert _imports(path) <= {"ttsstream.exceptions"}
