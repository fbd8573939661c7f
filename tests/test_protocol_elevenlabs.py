"""ElevenLabs' protocols without sockets: frames in → actions out, and every frame we
encode read back by the real clients' own models and parsers."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from ttsstream.audio.formats import MP3, format_named
from ttsstream.core.timings import CharacterTimes
from ttsstream.engines.base import Voice, WordEvent
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    ClientError,
    EmptyText,
    InvalidParameter,
    NotFound,
    QueueFull,
    TextTooLong,
    UnsupportedFormat,
)
from ttsstream.protocols.actions import Action, Append, CloseSocket, Finish, Flush, Speak
from ttsstream.protocols.elevenlabs import (
    MAX_CONTEXTS,
    MAX_INACTIVITY_TIMEOUT,
    SINGLE_CONTEXT_ID,
    StreamInput,
    encode_http_error,
    encode_voices,
    encode_with_timestamps,
    parse_query,
    parse_speech_body,
    speed_to_rate,
)

VOICE = "en-US-AriaNeural"
OPEN = {"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}


def _frame(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def _stream(multi: bool, **query: str) -> StreamInput:
    return StreamInput(VOICE, query, multi=multi, max_text_length=100)


def _run(stream: StreamInput, messages: list[dict[str, Any]]) -> list[Action]:
    return [action for message in messages for action in stream.receive(_frame(message))]


def _speak(context_id: str, text: str = "", **fields: Any) -> Speak:
    return Speak(id=context_id, text=text, voice=VOICE, stream=True, **fields)


S = SINGLE_CONTEXT_ID

#: (what it proves, multi, frames in, actions out)
CASES: list[tuple[str, bool, list[dict[str, Any]], list[Action]]] = [
    (
        "the SDK's realtime stream: opener, words, end of stream",
        False,
        [
            {
                "text": " ",
                "try_trigger_generation": True,
                "voice_settings": None,
                "generation_config": {"chunk_length_schedule": [50]},
            },
            {"text": "Hello, how are you? ", "try_trigger_generation": True},
            {"text": ""},
        ],
        [
            _speak(S, min_chars=50),
            Append(S, "Hello, how are you? "),
            Finish(S),
            CloseSocket(1000, "end of stream"),
        ],
    ),
    (
        "the documented opener: speed as a rate, the schedule's first entry as min_chars",
        False,
        [
            {
                "text": " ",
                "voice_settings": {"stability": 0.5, "similarity_boost": 0.8, "speed": 1.1},
                "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]},
                "xi_api_key": "k",
            },
            {"text": "Hello "},
            {"flush": True},
            {"text": " "},
        ],
        [_speak(S, rate="+10%", min_chars=120), Append(S, "Hello "), Flush(S), Append(S, " ")],
    ),
    (
        "a first message with text starts the utterance with it",
        False,
        [{"text": "Hi there. ", "flush": True}],
        [_speak(S, "Hi there. "), Flush(S)],
    ),
    (
        "Pipecat: context-less keep-alive, a context opened, text, keep-alive, flush, close",
        True,
        [
            {"text": ""},
            {"text": " ", "context_id": "a", "voice_settings": {"speed": 0.9}},
            {"text": "Hello world. ", "context_id": "a"},
            {"text": "", "context_id": "a"},
            {"context_id": "a", "flush": True},
            {"context_id": "a", "close_context": True},
        ],
        [_speak("a", rate="-10%"), Append("a", "Hello world. "), Flush("a"), Finish("a")],
    ),
    (
        "LiveKit: opener, text, empty flush, close; then a close_socket",
        True,
        [
            {
                "text": " ",
                "voice_settings": {},
                "context_id": "k1",
                "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]},
            },
            {"text": "Hi. ", "context_id": "k1", "flush": True},
            {"text": "", "context_id": "k1", "flush": True},
            {"context_id": "k1", "close_context": True},
            {"close_socket": True},
        ],
        [
            _speak("k1", min_chars=120),
            Append("k1", "Hi. "),
            Flush("k1"),
            Flush("k1"),
            Finish("k1"),
            CloseSocket(1000, "close_socket"),
        ],
    ),
    (
        "a closed context still speaking is left to finish when the next opens (Pipecat "
        "closes every context at the end of a reply)",
        True,
        [
            {**OPEN, "context_id": "t1"},
            {"text": "A long answer. ", "context_id": "t1"},
            {"context_id": "t1", "close_context": True},
            {**OPEN, "context_id": "t2"},
        ],
        [_speak("t1"), Append("t1", "A long answer. "), Finish("t1"), _speak("t2")],
    ),
    (
        "an open context is left alone when another opens",
        True,
        [{**OPEN, "context_id": "x"}, {**OPEN, "context_id": "y"}],
        [_speak("x"), _speak("y")],
    ),
    (
        "multi without a context_id uses the default context",
        True,
        [{"text": "Hello "}],
        [_speak(S, "Hello ")],
    ),
]


@pytest.mark.parametrize(
    ("multi", "frames", "actions"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_frames_become_actions(
    multi: bool, frames: list[dict[str, Any]], actions: list[Action]
) -> None:
    """Each client's sequence of frames asks exactly these actions."""
    assert _run(_stream(multi), frames) == actions


def test_auto_mode_leaves_the_segmenting_to_the_server() -> None:
    """auto_mode=true disables ElevenLabs' chunk schedule: min_chars stays the server's."""
    stream = _stream(False, auto_mode="true")
    (speak,) = stream.receive(
        _frame({"text": " ", "generation_config": {"chunk_length_schedule": [120]}})
    )
    assert isinstance(speak, Speak) and speak.min_chars is None


def test_the_format_comes_from_output_format() -> None:
    """The query's output_format is the utterances' format."""
    (speak,) = _stream(True, output_format="pcm_16000").receive(_frame(OPEN))
    assert isinstance(speak, Speak) and speak.format == format_named("pcm_16000")


#: (what it proves, multi, frames before, refused frame, error, its utterance_id)
REFUSALS: list[
    tuple[str, bool, list[dict[str, Any]], str | bytes, type[ClientError], str | None]
] = [
    ("not JSON", False, [], "{", BadJSON, None),
    ("binary", False, [], b"{}", BadMessage, None),
    ("not an object", True, [], "[]", BadMessage, None),
    ("text not a string", True, [], _frame({"text": 3, "context_id": "a"}), BadMessage, "a"),
    ("text too long", True, [OPEN], _frame({"text": "x" * 101}), TextTooLong, S),
    (
        "speed out of range",
        True,
        [],
        _frame({"text": " ", "context_id": "a", "voice_settings": {"speed": 1.5}}),
        InvalidParameter,
        "a",
    ),
    (
        "speed not a number",
        False,
        [],
        _frame({"text": " ", "voice_settings": {"speed": "1"}}),
        BadMessage,
        S,
    ),
    (
        "a schedule out of range",
        False,
        [],
        _frame({"text": " ", "generation_config": {"chunk_length_schedule": [10]}}),
        InvalidParameter,
        S,
    ),
    (
        "a context_id too long",
        True,
        [],
        _frame({"text": " ", "context_id": "c" * 65}),
        InvalidParameter,
        None,
    ),
    (
        "closing a context never opened",
        True,
        [],
        _frame({"context_id": "z", "close_context": True}),
        NotFound,
        "z",
    ),
    (
        "text after the end of stream",
        False,
        [OPEN, {"text": ""}],
        _frame({"text": "more "}),
        BadMessage,
        S,
    ),
    (
        "text after close_socket",
        True,
        [{"close_socket": True}],
        _frame({"text": "x", "context_id": "a"}),
        BadMessage,
        "a",
    ),
    (
        "one context too many",
        True,
        [{**OPEN, "context_id": f"c{n}"} for n in range(MAX_CONTEXTS)],
        _frame({**OPEN, "context_id": "extra"}),
        QueueFull,
        "extra",
    ),
]


@pytest.mark.parametrize(
    ("multi", "before", "frame", "error", "utterance_id"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_bad_input_is_refused_with_its_context(
    multi: bool,
    before: list[dict[str, Any]],
    frame: str | bytes,
    error: type[ClientError],
    utterance_id: str | None,
) -> None:
    """A bad frame raises the client error that names it, with its context's id when known."""
    stream = _stream(multi)
    _run(stream, before)
    with pytest.raises(error) as caught:
        stream.receive(frame)
    assert caught.value.utterance_id == utterance_id


@pytest.mark.parametrize(
    ("message", "key"),
    [
        ({"text": " ", "xi_api_key": "a"}, "a"),
        ({"text": " ", "xi-api-key": "b"}, "b"),
        ({"text": " ", "authorization": "Bearer c"}, "c"),
        ({"text": " "}, None),
    ],
)
def test_the_first_message_key_is_surfaced(message: dict[str, Any], key: str | None) -> None:
    """The key in the first message (any of its spellings) is there for the door to check."""
    stream = _stream(True)
    assert stream.api_key is None and not stream.started
    stream.receive(_frame(message))
    assert stream.started and stream.api_key == key


def test_only_the_first_message_gives_the_key() -> None:
    """A key in a later message is not taken: ElevenLabs reads it from the first only."""
    stream = _stream(False)
    stream.receive(_frame({"text": " "}))
    stream.receive(_frame({"text": "Hi ", "xi_api_key": "late"}))
    assert stream.api_key is None


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"output_format": "mp3_1_2"}, UnsupportedFormat),
        ({"enable_ssml_parsing": "true"}, InvalidParameter),
        ({"auto_mode": "maybe"}, InvalidParameter),
        ({"inactivity_timeout": "0"}, InvalidParameter),
        ({"inactivity_timeout": str(MAX_INACTIVITY_TIMEOUT + 1)}, InvalidParameter),
        ({"inactivity_timeout": "soon"}, InvalidParameter),
    ],
)
def test_a_bad_query_refuses_the_handshake(query: dict[str, str], error: type[ClientError]) -> None:
    """The query is checked when the connection's state is made: the door refuses the
    handshake with the error."""
    with pytest.raises(error):
        StreamInput(VOICE, query, multi=True, max_text_length=100)


def test_the_query_defaults_and_its_edges() -> None:
    """No query: mp3, 20 s, no auto mode, per-message times; 180 s is the longest timeout;
    model_id and the other ElevenLabs parameters are ignored."""
    options = parse_query({"model_id": "eleven_flash_v2_5", "enable_logging": "true"})
    assert (options.format, options.inactivity_timeout, options.auto_mode) == (MP3, 20.0, False)
    assert parse_query({"inactivity_timeout": "180"}).inactivity_timeout == 180.0
    assert parse_query({"enable_ssml_parsing": "false", "sync_alignment": "true"}).sync_alignment


def test_the_real_clients_handshakes_are_accepted() -> None:
    """LiveKit's URL query and context opener, and Pipecat's, parse as they are."""
    from urllib.parse import parse_qsl, urlsplit

    from livekit.plugins.elevenlabs.tts import TTS, _build_context_init_packet, _multi_stream_url

    tts = TTS(api_key="k", chunk_length_schedule=[120, 160, 250, 290])
    query = dict(parse_qsl(urlsplit(_multi_stream_url(tts._opts)).query))
    stream = StreamInput(VOICE, query, multi=True, max_text_length=100)
    assert stream.options.sync_alignment and stream.options.inactivity_timeout == 180
    (speak,) = stream.receive(
        orjson.dumps(_build_context_init_packet(tts._opts, context_id="c")).decode()
    )
    assert speak == _speak("c", min_chars=120, format=stream.options.format)

    pipecat = "model_id=eleven_flash_v2_5&output_format=pcm_24000&auto_mode=true"
    assert parse_query(dict(parse_qsl(pipecat))).format == format_named("pcm_24000")


def test_speed_maps_to_a_rate() -> None:
    """1.0 is +0%, the range's ends are -30% and +20%, absent is no rate."""
    assert [speed_to_rate(s) for s in (1.0, 0.7, 1.2, None)] == ["+0%", "-30%", "+20%", None]


def _spoken(stream: StreamInput, context_id: str, text: str) -> list[bytes]:
    """Frames for a context that speaks ``text`` in two chunks of audio."""
    stream.receive(_frame({**OPEN, "context_id": context_id}))
    stream.receive(_frame({"text": text, "context_id": context_id}))
    stream.words(context_id, [WordEvent("Hello", 50, 200, 0, 5), WordEvent("you", 400, 150, 6, 9)])
    return [
        stream.encode_audio(context_id, b"\x01\x02", audio_ms=300),
        stream.encode_audio(context_id, b"\x03", audio_ms=400),
        *stream.encode_final(context_id),
    ]


def test_multi_frames_parse_with_the_sdk_models() -> None:
    """Our audio and final frames validate as the SDK's multi-context server messages,
    with the context id, the audio and the alignment where it reads them."""
    from elevenlabs.types import AudioOutputMulti, FinalOutputMulti, WebsocketTtsServerMessageMulti

    frames = _spoken(_stream(True), "ctx", "Hello you. ")
    first = AudioOutputMulti.model_validate(orjson.loads(frames[0]))
    assert first.context_id == "ctx" and base64.b64decode(first.audio) == b"\x01\x02"
    assert first.alignment is not None and first.alignment.chars == list("Hello ")
    assert first.normalized_alignment is not None
    assert first.normalized_alignment.chars == first.alignment.chars
    chars = ""
    for frame in frames[:-1]:
        alignment = WebsocketTtsServerMessageMulti.model_validate(orjson.loads(frame)).alignment
        chars += "".join(alignment.chars or []) if alignment is not None else ""
    assert chars == "Hello you. "
    final = FinalOutputMulti.model_validate(orjson.loads(frames[-1]))
    assert final.is_final is True and final.context_id == "ctx"
    assert orjson.loads(frames[0])["isFinal"] is None


def test_single_frames_parse_with_the_sdk_models() -> None:
    """On /stream-input the frames have no contextId and validate as AudioOutput / FinalOutput."""
    from elevenlabs.types import AudioOutput, FinalOutput

    stream = _stream(False)
    stream.receive(_frame(OPEN))
    stream.receive(_frame({"text": "Hello you. "}))
    stream.words(S, [WordEvent("Hello", 50, 200, 0, 5)])
    audio = orjson.loads(stream.encode_audio(S, b"\x00", audio_ms=300))
    assert "contextId" not in audio
    assert AudioOutput.model_validate(audio).alignment is not None
    final = orjson.loads(stream.encode_final(S)[-1])
    assert final == {"isFinal": True} and FinalOutput.model_validate(final).is_final


def test_pipecat_reads_our_frames_as_its_context() -> None:
    """Pipecat's receive path: contextId routes, isFinal ends, alignment gives the words."""
    from pipecat.services.elevenlabs.tts_base import _select_alignment, calculate_word_times

    frames = [orjson.loads(f) for f in _spoken(_stream(True), "p", "Hello you. ")]
    assert all(f.get("contextId") == "p" for f in frames)
    assert frames[-1].get("isFinal") is True
    cumulative, partial, start = 0.0, "", 0.0
    words: list[tuple[str, float]] = []
    for f in frames[:-1]:
        alignment = _select_alignment(
            f,
            normalized_key="normalizedAlignment",
            alignment_key="alignment",
            prefer_normalized=False,
        )
        if alignment:
            found, partial, start = calculate_word_times(alignment, cumulative, partial, start)
            words += found
            cumulative += (
                alignment["charStartTimesMs"][-1] + alignment["charDurationsMs"][-1]
            ) / 1000
    assert words == [("Hello", 0.05), ("you.", 0.4)]


def test_errors_carry_what_the_clients_read() -> None:
    """An error has message (the SDK) and error (LiveKit), and contextId on multi."""
    exc = NotFound("no open context has this context_id", utterance_id="z")
    assert orjson.loads(_stream(True).encode_error(exc)) == {
        "message": "no open context has this context_id",
        "error": "not_found",
        "contextId": "z",
    }
    assert "contextId" not in orjson.loads(_stream(False).encode_error(exc))
    assert orjson.loads(_stream(True).encode_error(RuntimeError("secret"))) == {
        "message": "internal server error",
        "error": "internal",
    }


def test_a_context_id_is_free_again_once_its_context_ended() -> None:
    """After isFinal the id may open a new context (the SDK says it is not linked)."""
    stream = _stream(True)
    _spoken(stream, "again", "Hi ")
    assert stream.receive(_frame({**OPEN, "context_id": "again"})) == [_speak("again")]


def test_sync_alignment_times_count_from_the_context_start() -> None:
    """With sync_alignment=true (LiveKit) a later message's times are on the context's clock."""
    per_message = [orjson.loads(f) for f in _spoken(_stream(True), "a", "Hello you. ")]
    per_context = [
        orjson.loads(f) for f in _spoken(_stream(True, sync_alignment="true"), "a", "Hello you. ")
    ]
    assert per_message[1]["alignment"]["charStartTimesMs"][0] < 300
    assert per_context[1]["alignment"]["charStartTimesMs"][0] >= 300


# HTTP


def test_the_speech_body_is_read_with_its_query() -> None:
    """text, voice_settings.speed and output_format are read; model_id and the rest ignored."""
    request = parse_speech_body(
        {
            "text": "Hello",
            "model_id": "eleven_flash_v2_5",
            "voice_settings": {"speed": 1.2},
            "previous_text": None,
            "seed": 3,
        },
        voice_id=VOICE,
        query={"output_format": "ulaw_8000"},
        max_text_length=10,
    )
    assert (request.text, request.voice, request.rate) == ("Hello", VOICE, "+20%")
    assert request.format == format_named("ulaw_8000")
    assert (
        parse_speech_body({"text": "Hi"}, voice_id=VOICE, query={}, max_text_length=10).format
        == MP3
    )


@pytest.mark.parametrize(
    ("body", "query", "error"),
    [
        ([], {}, BadMessage),
        ({}, {}, BadMessage),
        ({"text": "  "}, {}, EmptyText),
        ({"text": "x" * 11}, {}, TextTooLong),
        ({"text": "Hi"}, {"output_format": "wav_3"}, UnsupportedFormat),
        ({"text": "Hi", "voice_settings": {"speed": 9}}, {}, InvalidParameter),
    ],
)
def test_a_bad_speech_body_is_refused(
    body: object, query: dict[str, str], error: type[ClientError]
) -> None:
    """Each bad body or query raises the error that names it."""
    with pytest.raises(error):
        parse_speech_body(body, voice_id=VOICE, query=query, max_text_length=10)


def test_with_timestamps_parses_with_the_sdk_model() -> None:
    """The with-timestamps JSON validates as the SDK's response, in seconds."""
    from elevenlabs.types import (
        AudioWithTimestampsResponse,
        StreamingAudioChunkWithTimestampsResponse,
    )

    body = orjson.loads(
        encode_with_timestamps(b"abc", CharacterTimes(("H", "i"), (0, 100), (100, 250)))
    )
    for model in (AudioWithTimestampsResponse, StreamingAudioChunkWithTimestampsResponse):
        parsed = model.model_validate(body)
        assert base64.b64decode(parsed.audio_base_64) == b"abc"
        assert parsed.alignment is not None
        assert parsed.alignment.character_end_times_seconds == [0.1, 0.25]


def test_voices_parse_with_the_sdk_and_livekit() -> None:
    """GET /v1/voices validates as the SDK's response and LiveKit lists it."""
    from elevenlabs.types import GetVoicesResponse
    from livekit.plugins.elevenlabs.tts import _dict_to_voices_list

    body = orjson.loads(encode_voices([Voice(VOICE, "en-US", "Female", "edge")]))
    (voice,) = GetVoicesResponse.model_validate(body).voices
    assert voice.voice_id == VOICE and voice.labels is not None
    assert voice.labels["gender"] == "female" and voice.labels["language"] == "en"
    assert _dict_to_voices_list(body)[0].id == VOICE


def test_http_errors_have_elevenlabs_detail() -> None:
    """An HTTP error body is {"detail": {"status", "message"}}."""
    assert orjson.loads(encode_http_error(UnsupportedFormat("Invalid output format: x"))) == {
        "detail": {"status": "unsupported_format", "message": "Invalid output format: x"}
    }
