"""Scenario 12's micro-measure: what an utterance's resume log holds in memory, against
what its bound counts (``RESUME_BUFFER_MB``, ``RESUME_TOTAL_MB``: the frames' lengths).

Logs are filled as a server fills them (``Buffers.add`` for every frame, ``Buffers.ended``
at the end), with frames made as a live utterance's are: ``start``, a ``words`` message
per word (``encode_words``, orjson), audio chunks cut from larger messages as edge-tts
cuts them, ``end``. Measured with tracemalloc, apart from a server:

  held      the memory the logs hold, per utterance, and its parts: the JSON messages,
            the audio chunks, the log's own records (a tuple and an int per frame)
  trimmed   the same with each JSON message copied to a bytes object of its own size
            (``bytes(memoryview(message))``) before it is kept: orjson returns its
            output in a buffer of at least about 4 KB, not shrunk
  timing    ``Buffers.add`` per frame, ``Buffers.release`` per frame (a connection's
            end), and the copy per message, µs (tracemalloc off)

    python bench/resume_logs.py SPEC_JSON     prints one JSON line of results

SPEC_JSON: ``{"utterances": 100, "words": 143, "audio": 353232, "chunks": 613}`` (per
utterance: words, audio bytes, audio chunks).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import tracemalloc
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ttsstream.engines.base import WordEvent  # noqa: E402
from ttsstream.protocols.v1 import encode_end, encode_start, encode_words  # noqa: E402
from ttsstream.ws.resume import Buffers, Logs  # noqa: E402

#: Bytes of headers before the audio in each of the service's audio messages.
HEADER = 130
#: Rounds of the timing measures.
ROUNDS = 5
#: Utterances of one connection released at once in the timing measure.
RELEASED = 10


def texts(number: int, spec: dict[str, Any]) -> list[bytes]:
    """One utterance's JSON messages as the server encodes them: ``start``, a ``words``
    message per word, ``end``."""
    uid = f"d{number}"
    words, audio = spec["words"], spec["audio"]
    start = encode_start(
        uid,
        voice="en-US-EmmaMultilingualNeural",
        engine="edge",
        mime_type="audio/mpeg",
        format_name="mp3",
        sample_rate=24000,
        cached=False,
    )
    messages = [
        encode_words(uid, [WordEvent(f"word{n:04d}", 100.0 + 450 * n, 435.0, 8 * n, 8 * n + 7)])
        for n in range(words)
    ]
    end = encode_end(
        uid, byte_count=audio, audio_ms=audio / 6, words=words, cached=False, ttfb_ms=150.0
    )
    return [start, *messages, end]


def chunks(spec: dict[str, Any]) -> list[bytes]:
    """One utterance's audio chunks, each cut from a message of the service's as edge-tts
    cuts them (a bytes object of its own)."""
    size = spec["audio"] // spec["chunks"]
    message = bytes(HEADER) + bytes(range(256)) * (size // 256 + 1)
    return [message[HEADER : HEADER + size] for _ in range(spec["chunks"])]


def in_order(messages: list[bytes], audio: list[bytes]) -> list[tuple[bytes, bool]]:
    """The frames as a live utterance sends them: ``start``, each word's message ahead of
    its share of the audio, ``end``."""
    words = messages[1:-1]
    out: list[tuple[bytes, bool]] = [(messages[0], True)]
    for number, chunk in enumerate(audio):
        first = number * len(words) // len(audio)
        last = (number + 1) * len(words) // len(audio)
        out += [(word, True) for word in words[first : max(last, first + (number == 0))]]
        out.append((chunk, False))
    sent = sum(1 for _, text in out if text) - 1
    out += [(word, True) for word in words[sent:]]
    out.append((messages[-1], True))
    return out


def held(spec: dict[str, Any], keep: Callable[[bytes], bytes]) -> dict[str, float]:
    """MB per utterance of ``spec["utterances"]`` logs, each JSON message kept as ``keep``
    gives it: what the buffers count, what the logs hold, and its parts (the JSON
    messages, the audio chunks, the logs' own records)."""
    gc.collect()
    tracemalloc.start()
    parts = dict.fromkeys(("json", "audio", "records"), 0)
    buffers = Buffers(2**40, 2**40)
    connections: list[Logs] = []
    try:
        base = tracemalloc.get_traced_memory()[0]
        for number in range(spec["utterances"]):
            mark = tracemalloc.get_traced_memory()[0]
            messages = [keep(message) for message in texts(number, spec)]
            parts["json"] += tracemalloc.get_traced_memory()[0] - mark
            mark = tracemalloc.get_traced_memory()[0]
            audio = chunks(spec)
            parts["audio"] += tracemalloc.get_traced_memory()[0] - mark
            utterance = in_order(messages, audio)
            del messages, audio
            mark = tracemalloc.get_traced_memory()[0]
            logs = Logs()
            log = logs.open(f"d{number}")
            for frame, text in utterance:
                buffers.add(logs, log, frame, text)
            buffers.ended(logs, log)
            connections.append(logs)
            del utterance
            parts["records"] += tracemalloc.get_traced_memory()[0] - mark
        total = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    count = spec["utterances"]
    return {
        "counted_mb": buffers.total / count / 2**20,
        "held_mb": total / count / 2**20,
        **{f"{part}_mb": size / count / 2**20 for part, size in parts.items()},
    }


def timing(spec: dict[str, Any]) -> dict[str, float]:
    """µs (best of ROUNDS): ``Buffers.add`` per frame; ``Buffers.release`` per frame, as
    at a connection's end, of RELEASED utterances' logs whose frames nothing else holds;
    a JSON message's right-sizing copy."""
    add, release, trim = [], [], []
    for _ in range(ROUNDS):
        buffers = Buffers(2**40, 2**40)
        logs = Logs()
        count = 0
        for number in range(RELEASED):
            messages = texts(number, spec)
            utterance = in_order(messages, chunks(spec))
            log = logs.open(f"d{number}")
            started = time.perf_counter()
            for frame, text in utterance:
                buffers.add(logs, log, frame, text)
            add.append((time.perf_counter() - started) / len(utterance))
            buffers.ended(logs, log)
            count += len(utterance)
            del utterance
        started = time.perf_counter()
        buffers.release(logs)
        release.append((time.perf_counter() - started) / count)
        started = time.perf_counter()
        for message in messages:
            bytes(memoryview(message))
        trim.append((time.perf_counter() - started) / len(messages))
    return {
        "add_us": min(add) * 1e6,
        "release_us": min(release) * 1e6,
        "released": RELEASED,
        "trim_us": min(trim) * 1e6,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    messages = texts(0, spec)
    utterance = in_order(messages, chunks(spec))
    # orjson's allocation for one message, against its length.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [encode_words("d0", [WordEvent("word", 100.0, 435.0, 0, 4)]) for _ in range(1000)]
    per_message = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    tracemalloc.stop()
    result = {
        "utterances": spec["utterances"],
        "frames": len(utterance),
        "texts": len(messages),
        "text_length": sum(map(len, messages)) / len(messages),
        "orjson": metadata.version("orjson"),
        "message_length": len(kept[0]),
        "message_held": per_message,
        "as_sent": held(spec, lambda frame: frame),
        "trimmed": held(spec, lambda frame: bytes(memoryview(frame))),
        **timing(spec),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
