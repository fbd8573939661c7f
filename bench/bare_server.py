"""Baseline (b): a bare websockets server that replays MP3 bytes from memory.

It answers every text frame with the same audio, in 16 KiB binary frames, then an
``end`` message: the replay path with nothing of ttsstream in it, so the
benchmark can show what the stack itself costs.

    python bench/bare_server.py AUDIO_FILE     prints its port, serves until killed
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve

CHUNK = 16 * 2**10


async def main(audio: bytes) -> None:
    end = b'{"type":"end","id":"b","cached":true}'

    async def handler(ws: ServerConnection) -> None:
        await ws.send(b'{"type":"hello"}', text=True)
        async for _ in ws:
            for offset in range(0, len(audio), CHUNK):
                await ws.send(audio[offset : offset + CHUNK])
            await ws.send(end, text=True)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=2**16) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]).read_bytes()))
