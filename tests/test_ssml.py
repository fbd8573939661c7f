"""SSML on Edge: a document parsed (safely) into spans, each one synthesis with its own
voice and prosody, breaks as exact silence, on one timeline (issue 36)."""

from __future__ import annotations

import array
from pathlib import Path
from typing import Any

import aiohttp
import miniaudio
import pytest

from tests.conftest import ServerFactory, eventually, url_of
from tests.fake_edge import FakeEdge
from tests.test_resume import Copy, Listener
from ttsstream.core.ssml import Pause, Spoken, parse_ssml
from ttsstream.exceptions import SsmlInvalid, SsmlUnsupported
from ttsstream.server import Server

NS = 'version="1.0" xmlns="http://www.w3.org/2001/10/synthesis" xml:lang="en-US"'
DIALOGUE = (
    f"<speak {NS}>"
    '<voice name="en-US-AriaNeural">Did you hear the news today?</voice>'
    '<break time="700ms"/>'
    '<voice name="en-US-GuyNeural"><prosody rate="-20%" pitch="+10Hz">'
    "Not yet, tell me.</prosody></voice>"
    '<break time="300ms"/>'
    '<voice name="en-US-AriaNeural">The train is on time.</voice>'
    "</speak>"
)


def parse(document: str, **limits: Any) -> tuple[Spoken | Pause, ...]:
    settings = {"default_voice": "en-US-EmmaNeural", "max_chars": 5000, "max_spans": 64}
    return parse_ssml(document, **{**settings, **limits}).pieces


# The parser


def test_a_dialogue_is_spans_and_pauses() -> None:
    pieces = parse(DIALOGUE)
    assert [type(piece).__name__ for piece in pieces] == [
        "Spoken",
        "Pause",
        "Spoken",
        "Pause",
        "Spoken",
    ]
    first, pause, second, _, third = pieces
    assert isinstance(first, Spoken) and isinstance(second, Spoken) and isinstance(third, Spoken)
    assert (first.voice, second.voice, third.voice) == (
        "en-US-AriaNeural",
        "en-US-GuyNeural",
        "en-US-AriaNeural",
    )
    assert (second.rate, second.pitch, second.volume) == ("-20%", "+10Hz", "+0%")
    assert pause == Pause(700)


@pytest.mark.parametrize(
    ("markup", "spoken", "prosody"),
    [
        ('<prosody rate="x-slow">slow</prosody>', "slow", ("-50%", "+0%", "+0Hz")),
        ('<prosody rate="1.5">fast</prosody>', "fast", ("+50%", "+0%", "+0Hz")),
        ('<prosody volume="soft">soft</prosody>', "soft", ("+0%", "-60%", "+0Hz")),
        ('<prosody volume="-6dB">quiet</prosody>', "quiet", ("+0%", "-50%", "+0Hz")),
        ('<prosody pitch="high">high</prosody>', "high", ("+0%", "+0%", "+40Hz")),
        ('<prosody rate="+300%">clamped</prosody>', "clamped", ("+200%", "+0%", "+0Hz")),
        (
            '<prosody rate="+50%"><prosody rate="+50%">nested</prosody></prosody>',
            "nested",
            ("+125%", "+0%", "+0Hz"),
        ),
        ('<emphasis level="strong">this</emphasis>', "this", ("-20%", "+40%", "+0Hz")),
        ('<sub alias="World Wide Web">WWW</sub>', "World Wide Web", ("+0%", "+0%", "+0Hz")),
        ('<say-as interpret-as="cardinal">42</say-as>', "forty-two", ("+0%", "+0%", "+0Hz")),
        ('<say-as interpret-as="ordinal">3</say-as>', "third", ("+0%", "+0%", "+0Hz")),
        ('<say-as interpret-as="characters">abc</say-as>', "a b c", ("+0%", "+0%", "+0Hz")),
        ('<say-as interpret-as="digits">2026</say-as>', "2 0 2 6", ("+0%", "+0%", "+0Hz")),
        (
            '<say-as interpret-as="date">2026-12-07</say-as>',
            "December seventh, 2026",
            ("+0%", "+0%", "+0Hz"),
        ),
        ('<say-as interpret-as="time">9:05</say-as>', "nine oh five", ("+0%", "+0%", "+0Hz")),
        (
            '<phoneme alphabet="ipa" ph="təˈmeɪtoʊ">tomato</phoneme>',
            "tomato",
            ("+0%", "+0%", "+0Hz"),
        ),
        ('<lang xml:lang="de-DE">Hallo</lang>', "Hallo", ("+0%", "+0%", "+0Hz")),
        ("<p><s>Two</s></p>", "Two", ("+0%", "+0%", "+0Hz")),
        ('<bookmark mark="here"/>Marked', "Marked", ("+0%", "+0%", "+0Hz")),
    ],
)
def test_each_element_as_the_table_says(
    markup: str, spoken: str, prosody: tuple[str, str, str]
) -> None:
    (piece,) = parse(f"<speak {NS}>{markup}</speak>")
    assert isinstance(piece, Spoken)
    assert piece.text == spoken and (piece.rate, piece.volume, piece.pitch) == prosody


@pytest.mark.parametrize(
    "voice",
    ["de-DE-KatjaNeural", "Microsoft Server Speech Text to Speech Voice (de-DE, KatjaNeural)"],
)
def test_a_numbers_language_is_its_voices(voice: str) -> None:
    """Short or Azure's long name, the voice's language is the one numbers are said in."""
    (piece,) = parse(
        f'<speak {NS}><voice name="{voice}">'
        '<say-as interpret-as="cardinal">42</say-as></voice></speak>'
    )
    assert isinstance(piece, Spoken) and piece.text == "zweiundvierzig"


@pytest.mark.parametrize(
    ("document", "error", "names"),
    [
        (
            f"<speak {NS}>"
            '<mstts:express-as xmlns:mstts="http://www.w3.org/2001/mstts" style="cheerful">'
            "Hi</mstts:express-as></speak>",
            SsmlUnsupported,
            "mstts:express-as",
        ),
        (
            f'<speak {NS}><audio src="https://x/a.wav">Hi</audio></speak>',
            SsmlUnsupported,
            "<audio>",
        ),
        (
            f'<speak {NS}><prosody contour="(0%,+20Hz)" foo="1">Hi</prosody></speak>',
            SsmlUnsupported,
            "foo",
        ),
        ("<speak>unterminated", SsmlInvalid, "not well-formed"),
        ('<speak><voice name="<x>">Hi</voice></speak>', SsmlInvalid, "not well-formed"),
        ("<notspeak>Hi</notspeak>", SsmlInvalid, "<speak>"),
        (f"<speak {NS}></speak>", SsmlInvalid, "nothing to speak"),
        (f'<speak {NS}>Hi<break time="9s"/></speak>', SsmlInvalid, "at most"),
        (f'<speak {NS}>Hi<break time="soon"/></speak>', SsmlInvalid, "500ms"),
        (f'<speak {NS}><prosody rate="fastest">Hi</prosody></speak>', SsmlInvalid, "rate"),
        (f"<speak {NS}><say-as>1</say-as></speak>", SsmlInvalid, "interpret-as"),
    ],
)
def test_what_edge_cannot_speak_is_a_clear_error(
    document: str, error: type[Exception], names: str
) -> None:
    with pytest.raises(error) as raised:
        parse(document)
    assert names in str(raised.value)


def test_hostile_documents_are_refused_before_anything_grows() -> None:
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(f'<!ENTITY lol{n} "{("&lol" + str(n - 1) + ";") * 10}">' for n in range(1, 10))
        + "]><speak>&lol9;</speak>"
    ).replace("&lol0;", "&lol;")
    external = '<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]><speak>&x;</speak>'
    nested = "<speak>" + "<p>" * 10_000 + "deep" + "</p>" * 10_000 + "</speak>"
    breaks = "<speak>Hi" + '<break time="1ms"/>' * 100_000 + "</speak>"
    for document, says in (
        (laughs, "refused"),
        (external, "refused"),
        (nested, "deeper"),
        (breaks, "longer than"),
    ):
        with pytest.raises(SsmlInvalid) as raised:
            parse(document)
        assert says in str(raised.value), document[:80]
    with pytest.raises(SsmlInvalid, match="more than 3 spans"):
        parse(f"<speak {NS}>a<break/>b<break/>c<break/>d</speak>", max_spans=3)


# Spoken by a server


def decoded(mp3: bytes) -> array.array[int]:
    pcm = miniaudio.decode(
        mp3, output_format=miniaudio.SampleFormat.SIGNED16, nchannels=1, sample_rate=24_000
    )
    return array.array("h", pcm.samples)


def silences_ms(samples: array.array[int], *, at_least_ms: float = 150) -> list[float]:
    """The runs of silence in ``samples`` (24 kHz) longer than ``at_least_ms``."""
    runs, length = [], 0
    for sample in samples:
        if abs(sample) < 64:
            length += 1
            continue
        if length * 1000 / 24_000 >= at_least_ms:
            runs.append(length * 1000 / 24_000)
        length = 0
    return runs


async def test_a_dialogue_switches_voices_with_breaks_of_their_length(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    fake.tone = True
    server = await start_server()
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "d", "ssml": DIALOGUE, "words": "each"})
    await listener.until(lambda: "d" in listener.copies and listener.copies["d"].ended)
    await listener.close()
    copy = listener.copies["d"]
    assert copy.messages[-1]["type"] == "end", copy.messages[-1]
    assert [record.voice.split(", ")[1].rstrip(")") for record in fake.records] == [
        "AriaNeural",
        "GuyNeural",
        "AriaNeural",
    ]
    assert [record.rate for record in fake.records] == ["+0%", "-20%", "+0%"]
    # The breaks are silences of their length in the decoded audio (within 20 ms).
    gaps = silences_ms(decoded(bytes(copy.audio)))
    assert len(gaps) == 2, gaps
    assert abs(gaps[0] - 700) <= 20 and abs(gaps[1] - 300) <= 20, gaps
    # Words in order on one timeline, each slicing the document's text to itself.
    text = "Did you hear the news today?Not yet, tell me.The train is on time."
    words = [m for m in copy.messages if m["type"] == "word"]
    assert [text[w["char_start"] : w["char_end"]] for w in words] == [w["text"] for w in words]
    offsets = [w["offset_ms"] for w in words]
    assert offsets == sorted(offsets) and len(words) == 15


async def test_ssml_through_http_and_openai(start_server: ServerFactory, fake: FakeEdge) -> None:
    server = await start_server()
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            base + "/tts", data=DIALOGUE, headers={"Content-Type": "application/ssml+xml"}
        ) as response:
            assert response.status == 200, await response.text()
            body = await response.read()
        async with session.post(base + "/tts", json={"ssml": DIALOGUE}) as response:
            assert response.status == 200 and await response.read() == body
        speech = {"model": "tts-1", "voice": "alloy", "input": DIALOGUE}
        async with session.post(base + "/v1/audio/speech", json=speech) as response:
            assert response.status == 200 and await response.read() == body
        async with session.post(
            base + "/tts",
            data=f"<speak {NS}><audio src='x'/></speak>",
            headers={"Content-Type": "application/ssml+xml"},
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "ssml_unsupported"
    # Each span once: the later requests replayed every span from the cache.
    assert len(fake.records) == 3


async def spoken(server: Server, document: str) -> Copy:
    """What a client hears of ``document`` spoken over the WebSocket."""
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "ssml": document})
    await listener.until(lambda: "u" in listener.copies and listener.copies["u"].ended)
    await listener.close()
    return listener.copies["u"]


async def test_a_line_said_in_two_documents_is_one_cache_entry(
    start_server: ServerFactory, fake: FakeEdge, server: Server
) -> None:
    line = '<voice name="en-US-GuyNeural">Not yet, tell me.</voice>'
    for document in (
        f"<speak {NS}>{line}<break time='200ms'/>First.</speak>",
        f"<speak {NS}>Second.{line}</speak>",
    ):
        assert (await spoken(server, document)).messages[-1]["type"] == "end"
    assert sorted(record.text for record in fake.records) == [
        "First.",
        "Not yet, tell me.",
        "Second.",
    ]


async def test_hostile_ssml_reaches_nothing_upstream_and_the_connection_goes_on(
    server: Server, fake: FakeEdge
) -> None:
    listener = Listener(url_of(server))
    await listener.connect()
    bad = '<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]><speak>&x;</speak>'
    await listener.send({"type": "speak", "id": "bad", "ssml": bad})
    refused = await listener.message()
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "ssml_invalid", "bad")
    await listener.send({"type": "speak", "id": "both", "ssml": DIALOGUE, "text": "x"})
    assert (await listener.message())["code"] == "bad_message"
    await listener.send({"type": "speak", "id": "ok", "text": "Still here."})
    await listener.until(lambda: "ok" in listener.copies and listener.copies["ok"].ended)
    await listener.close()
    assert [record.text for record in fake.records] == ["Still here."]


async def test_the_offline_voice_speaks_the_spans_when_edge_cannot(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Microsoft down: every span is spoken by the offline voice, one stream, breaks
    included."""
    fake.refuse_status = 503
    server = await start_server(upstream_retries=0)
    copy = await spoken(server, DIALOGUE)
    assert copy.messages[-1]["type"] == "end", copy.messages[-1]
    start = copy.messages[0]
    assert start["engine"] == "espeak" and start["fallback_reason"] == "upstream_unavailable"
    assert len(copy.audio) > 0


# What an independent review found (each failed before its fix)


def test_review_hostile_values_are_bounded_not_crashes() -> None:
    big = "9" * 400
    (ordinal,) = parse(f"<speak {NS}><say-as interpret-as='ordinal'>1.5</say-as></speak>")
    assert isinstance(ordinal, Spoken) and ordinal.text == "1.5"  # as written
    with pytest.raises(SsmlInvalid, match="at most"):
        parse(f"<speak {NS}>Hi<break time='{big}ms'/></speak>")
    (loud,) = parse(
        f"<speak {NS}><prosody rate='{big[:300]}'><prosody rate='{big[:300]}'>x y"
        "</prosody></prosody></speak>"
    )
    assert isinstance(loud, Spoken) and loud.rate == "+200%"
    (exact,) = parse(
        f"<speak {NS}><say-as interpret-as='cardinal'>12345678901234567891</say-as></speak>"
    )
    assert isinstance(exact, Spoken) and exact.text.endswith("ninety-one")
    with pytest.raises(SsmlInvalid, match="speaks more than 50"):
        parse(f"<speak {NS}><sub alias='{'word ' * 20}'>x</sub></speak>", max_chars=50)


def test_review_a_line_is_the_same_however_it_is_indented() -> None:
    compact = parse(f'<speak {NS}><voice name="en-US-GuyNeural">Not yet, tell me.</voice></speak>')
    pretty = parse(
        f'<speak {NS}>\n  <voice name="en-US-GuyNeural">\n'
        "    Not yet,\n    tell me.\n  </voice>\n</speak>"
    )
    assert [p.text for p in compact if isinstance(p, Spoken)] == ["Not yet, tell me."]
    assert [p.text for p in pretty if isinstance(p, Spoken)] == ["Not yet, tell me."]


async def test_review_an_alias_is_charged_as_spoken_and_a_cancel_stops_edge(
    start_server: ServerFactory, fake: FakeEdge, tmp_path: Path
) -> None:
    from tests.test_tenants import ALPHA, write_keys

    path = write_keys(tmp_path / "keys.toml", {"a": {"key": ALPHA, "characters_per_day": 40}})
    server = await start_server(api_keys_file=path)
    alias = "a much longer text than the one it stands for, said aloud"
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            base + "/tts",
            json={"ssml": f"<speak {NS}><sub alias='{alias}'>x</sub></speak>"},
            headers={"X-API-Key": ALPHA},
        ) as response:
            assert response.status == 429 and (await response.json())["error"] == "quota_exceeded"
        # An OpenAI client's voice speaks a document that names none.
        speech = {"model": "tts-1", "voice": "en-US-GuyNeural", "input": f"<speak {NS}>Hi.</speak>"}
        async with session.post(
            base + "/v1/audio/speech", json=speech, headers={"X-API-Key": ALPHA}
        ) as response:
            assert response.status == 200
            await response.read()
    assert fake.records[-1].voice.endswith("GuyNeural)")
    fake.pause_after_chunks = 1
    listener = Listener(url_of(server), {"X-API-Key": ALPHA})
    await listener.connect()
    await listener.send({"type": "speak", "id": "c", "ssml": f"<speak {NS}>Cut me off.</speak>"})
    await listener.until(lambda: "c" in listener.copies and bool(listener.copies["c"].audio))
    await listener.send({"type": "cancel", "id": "c"})
    await listener.until(lambda: listener.copies["c"].messages[-1]["type"] == "cancelled")
    await listener.close()
    await eventually(lambda: fake.active == 0, what="the span's synthesis stopped")
    fake.resume.set()
