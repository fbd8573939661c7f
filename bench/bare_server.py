"""Baseline (b): a bare websockets server that replays MP3 bytes from memory.

It answers every text frame with the same audio, in 16 KiB binary frames, then an
``end`` message: the replay path with nothing of ttsstream in it, so the
benchmark can show what the stack itself costs. Given a ``start`` and an ``end``
message too (bench/burst.py gives ttsstream's own), it sends the start message
first and that end message: the very frames ttsstream sends, so that the clients'
share of the work is the same for both servers.

    python bench/bare_server.py AUDIO_FILE [START END]     prints its port, serves until killed
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve

CHUNK = 16 * 2**10


async def main(audio: bytes, start: bytes | None, end: bytes) -> None:

    async def handler(ws: ServerConnection) -> None:
        await ws.send(b'{"type":"hello"}', text=True)
        async for _ in ws:
            if start is not None:
                await ws.send(start, text=True)
            for offset in range(0, len(audio), CHUNK):
                await ws.send(audio[offset : offset + CHUNK])
            await ws.send(end, text=True)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=2**16) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    given = sys.argv[2:4]
    asyncio.run(
        main(
            Path(sys.argv[1]).read_bytes(),
            given[0].encode() if given else None,
            given[1].encode() if given else b'{"type":"end","id":"b","cached":true}',
        )
    )
