"""Every WebSocket protocol is sans-I/O in fact: importing it loads nothing that does I/O."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Modules that do I/O (or load the engines, which do): no protocol may import them.
IO_MODULES = ("asyncio", "socket", "av", "aiohttp", "edge_tts", "websockets", "redis")

PROTOCOLS = [
    "ttsstream.protocols.actions",
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
