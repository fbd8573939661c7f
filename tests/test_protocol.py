"""The wire format, without sockets: parsing client frames and encoding server messages."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttsstream.core.voices import in_locale
from ttsstream.engines.base import Voice, WordEvent
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    ClientError,
    EmptyText,
    InvalidParameter,
    InvalidVoice,
    NoAudio,
    RequestError,
    TextTooLong,
)
from ttsstream.protocols.v1 import (
    MAX_ID_LENGTH,
    Cancel,
    ListVoices,
    Speak,
    encode_end,
    encode_error,
    encode_hello,
    encode_start,
    encode_voices,
    encode_word,
    encode_words,
    parse_client_message,
)

_ids = itertools.count()


def parse(frame: str | bytes | dict[str, Any], max_text_length: int = 100) -> Any:
    if isinstance(frame, dict):
        frame = orjson.dumps(frame).decode()
    return parse_client_message(
        frame, max_text_length=max_text_length, make_id=lambda: f"gen-{next(_ids)}"
    )


def test_speak_with_every_field() -> None:
    """A full speak parses into a Speak with each field."""
    message = parse(
        {
            "type": "speak",
            "id": "u1",
            "text": "Hello",
            "voice": "en-US-AriaNeural",
            "rate": "+10%",
            "volume": "-20%",
            "pitch": "+5Hz",
            "words": "batch",
        }
    )
    assert message == Speak(
        id="u1",
        text="Hello",
        voice="en-US-AriaNeural",
        rate="+10%",
        volume="-20%",
        pitch="+5Hz",
        words="batch",
    )


@pytest.mark.parametrize("mode", ["each", "batch", "none"])
def test_speak_chooses_how_words_come(mode: str) -> None:
    """ "words" selects one word message each, batches, or none; "each" when missing."""
    assert parse({"type": "speak", "text": "Hi", "words": mode}).words == mode
    assert parse({"type": "speak", "text": "Hi"}).words == "each"


def test_speak_needs_only_text_and_gets_a_fresh_id() -> None:
    """Without id the server makes one, different each time; prosody defaults to neutral."""
    first, second = parse({"type": "speak", "text": "Hi"}), parse({"type": "speak", "text": "Hi"})
    assert first.id.startswith("gen-") and first.id != second.id
    assert (first.voice, first.rate, first.volume, first.pitch) == (None, "+0%", "+0%", "+0Hz")


def test_unknown_fields_are_ignored() -> None:
    """Unknown fields do not make a message invalid (forward compatibility)."""
    assert parse({"type": "speak", "id": "a", "text": "x", "future": [1, 2]}).text == "x"


def test_cancel_and_voices() -> None:
    """cancel with and without id, and voices with and without a locale, parse to their
    messages."""
    assert parse({"type": "cancel", "id": "u1"}) == Cancel(id="u1")
    assert parse({"type": "cancel"}) == Cancel(id=None)
    assert parse({"type": "voices"}) == ListVoices()
    assert parse({"type": "voices", "locale": "en-US"}) == ListVoices(locale="en-US")
    assert parse({"type": "voices", "locale": ""}) == ListVoices()
    with pytest.raises(BadMessage):
        parse({"type": "voices", "locale": ["en"]})


def test_null_is_a_field_left_out() -> None:
    """Every optional field sent as null parses as if it were left out (defect 7)."""
    nulls = {
        field: None for field in ("voice", "rate", "volume", "pitch", "words", "format", "stream")
    }
    speak = parse({"type": "speak", "id": "u1", "text": "Hi", **nulls})
    assert speak == Speak(id="u1", text="Hi")  # every field its default
    assert parse({"type": "speak", "id": None, "text": "Hi"}).id_given is False
    assert parse({"type": "voices", "locale": None}) == ListVoices()
    assert parse({"type": "cancel", "id": None}) == Cancel(id=None)
    with pytest.raises(BadMessage):  # a required field sent as null is still missing
        parse({"type": "speak", "id": "u1", "text": None})


@pytest.mark.parametrize(
    ("locale", "wanted", "matches"),
    [
        ("en-US", None, True),
        ("en-US", "", True),
        ("en-US", "en", True),
        ("en-GB", "EN", True),
        ("en", "en", True),
        ("en-US", "en-us", True),
        ("en-US", " en_US ", True),
        ("en-US-nyc", "en-US", True),
        ("en-GB-x-RP", "en-GB", True),
        ("en-US", "en-GB", False),
        ("eu", "en", False),
        ("en-USX", "en-US", False),
        ("en", "en-US", False),
        ("fr-FR", "fr-FR-x", False),
    ],
)
def test_one_locale_rule(locale: str, wanted: str | None, matches: bool) -> None:
    """A locale asked for matches the same locale or one it begins as a whole part of, in
    any case; nothing asked matches every voice (issue 32, defect 6)."""
    assert in_locale(locale, wanted) is matches


def test_the_voices_message_keeps_the_locale_asked_for() -> None:
    """encode_voices with a locale lists by the one locale rule: en keeps en-US, en-GB and
    eSpeak's en-US-nyc; en-US keeps en-US-nyc, not en-GB."""
    voices = [
        Voice("en-US-AriaNeural", "en-US", "Female", "edge"),
        Voice("en-GB-RyanNeural", "en-GB", "Male", "edge"),
        Voice("espeak:en-us-nyc", "en-US-nyc", "Male", "espeak"),
        Voice("fr-FR-DeniseNeural", "fr-FR", "Female", "edge"),
    ]

    def names(locale: str | None) -> list[str]:
        encoded = orjson.loads(encode_voices(voices, locale=locale))
        return [voice["name"] for voice in encoded["voices"]]

    assert names(None) == [voice.name for voice in voices]
    assert names("en") == ["en-US-AriaNeural", "en-GB-RyanNeural", "espeak:en-us-nyc"]
    assert names("en-US") == ["en-US-AriaNeural", "espeak:en-us-nyc"]
    assert names("de") == []


@pytest.mark.parametrize(
    ("frame", "error", "echoed_id"),
    [
        ("not json", BadJSON, None),
        ("{", BadJSON, None),
        ("[" * 5000 + "]" * 5000, BadJSON, None),
        ("NaN", BadJSON, None),
        (b"\x00\x01binary", BadMessage, None),
        ("[1, 2]", BadMessage, None),
        ('"speak"', BadMessage, None),
        ("null", BadMessage, None),
        ({"text": "no type"}, BadMessage, None),
        ({"type": 7, "text": "x"}, BadMessage, None),
        ({"type": "dance", "id": "d1"}, BadMessage, "d1"),
        ({"type": "speak", "id": "u1"}, BadMessage, "u1"),
        ({"type": "speak", "id": "u1", "text": 5}, BadMessage, "u1"),
        ({"type": "speak", "id": 5, "text": "x"}, BadMessage, None),
        ({"type": "speak", "id": "", "text": "x"}, InvalidParameter, None),
        ({"type": "speak", "id": "x" * (MAX_ID_LENGTH + 1), "text": "x"}, InvalidParameter, None),
        ({"type": "speak", "id": "u1", "text": ""}, EmptyText, "u1"),
        ({"type": "speak", "id": "u1", "text": " \n\t\u3000 "}, EmptyText, "u1"),
        ({"type": "speak", "id": "u1", "text": "\x00\x0b\x1f"}, EmptyText, "u1"),
        ({"type": "speak", "id": "u1", "text": "x" * 101}, TextTooLong, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "voice": 3}, BadMessage, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "voice": "Ar\x00ia"}, InvalidVoice, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "voice": "v" * 200}, InvalidVoice, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "rate": 10}, BadMessage, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "rate": "10%"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "rate": "+10"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "rate": "+١٠%"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "rate": "+99999%"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "volume": "+5Hz"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "pitch": "+5%"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "pitch": "+5Hz\n"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "words": True}, BadMessage, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "words": "all"}, InvalidParameter, "u1"),
        ({"type": "speak", "id": "u1", "text": "x", "words": "Batch"}, InvalidParameter, "u1"),
        ({"type": "cancel", "id": ["u1"]}, BadMessage, None),
    ],
)
def test_invalid_frames_get_their_code(
    frame: str | bytes | dict[str, Any], error: type[RequestError], echoed_id: str | None
) -> None:
    """Each kind of bad frame raises its own error, echoing the id only when it was valid."""
    with pytest.raises(error) as raised:
        parse(frame)
    assert type(raised.value) is error
    assert raised.value.utterance_id == echoed_id


def test_text_length_counts_characters_not_bytes() -> None:
    """MAX_TEXT_LENGTH counts characters: 100 two-byte characters fit a limit of 100."""
    assert parse({"type": "speak", "text": "é" * 100}).text == "é" * 100
    with pytest.raises(TextTooLong):
        parse({"type": "speak", "text": "é" * 101})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["speak", "cancel", "voices", "other"]) | json_values,
        "id": st.text(max_size=80) | json_values,
        "text": st.text(max_size=150) | json_values,
        "voice": st.text(max_size=10) | json_values,
        "rate": st.from_regex(r"[+-]?[0-9]{0,6}%?", fullmatch=True) | json_values,
        "volume": st.text(max_size=6) | json_values,
        "pitch": st.from_regex(r"[+-]?[0-9]{0,6}(Hz)?", fullmatch=True) | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary(),
        json_values.map(json.dumps),
        message_like.map(json.dumps),
    )
)
def test_parser_raises_nothing_but_its_own_errors(frame: str | bytes) -> None:
    """No frame makes the parser raise anything but a RequestError; what it accepts is valid."""
    try:
        message = parse(frame)
    except RequestError as exc:
        assert exc.code and exc.message
        return
    if isinstance(message, Speak):
        assert 1 <= len(message.id) <= MAX_ID_LENGTH
        assert 0 < len(message.text) <= 100


def test_encoded_messages_are_json_with_a_type() -> None:
    """Every server message is a JSON object with the documented fields."""
    hello = orjson.loads(encode_hello(server="ttsstream/1", default_voice="v", max_text_length=9))
    assert hello == {
        "type": "hello",
        "protocol": 1,
        "server": "ttsstream/1",
        "default_voice": "v",
        "max_text_length": 9,
    }
    start = orjson.loads(
        encode_start(
            "u",
            voice="v",
            engine="edge",
            mime_type="audio/ogg; codecs=opus",
            format_name="opus",
            sample_rate=24000,
            cached=False,
        )
    )
    assert start["type"] == "start" and start["format"] == "audio/ogg; codecs=opus"
    assert start["format_name"] == "opus"
    word = orjson.loads(encode_word("u", WordEvent("Hi", 100.0, 312.5, char_start=0, char_end=2)))
    assert word == {
        "type": "word",
        "id": "u",
        "text": "Hi",
        "offset_ms": 100.0,
        "duration_ms": 312.5,
        "char_start": 0,
        "char_end": 2,
    }
    words = orjson.loads(
        encode_words(
            "u",
            [
                WordEvent("Hi", 100.0, 312.5, char_start=0, char_end=2),
                WordEvent("there", 412.5, 1 / 3, char_start=None, char_end=None),
            ],
        )
    )
    assert words == {
        "type": "words",
        "id": "u",
        "words": [
            {
                "text": "Hi",
                "offset_ms": 100.0,
                "duration_ms": 312.5,
                "char_start": 0,
                "char_end": 2,
            },
            {
                "text": "there",
                "offset_ms": 412.5,
                "duration_ms": 0.333,  # microseconds at most
                "char_start": None,
                "char_end": None,
            },
        ],
    }
    end = orjson.loads(
        encode_end("u", byte_count=6, audio_ms=1.0, words=1, cached=False, ttfb_ms=2.5)
    )
    assert end == {
        "type": "end",
        "id": "u",
        "bytes": 6,
        "audio_ms": 1.0,
        "words": 1,
        "cached": False,
        "ttfb_ms": 2.5,
    }
    voices = orjson.loads(encode_voices([Voice("n", "en-US", "Female", "edge")]))
    assert voices == {
        "type": "voices",
        "voices": [{"name": "n", "locale": "en-US", "gender": "Female", "engine": "edge"}],
    }


def test_errors_map_to_codes_in_one_place() -> None:
    """Client errors keep their code and message; anything else is internal and says nothing."""
    error = orjson.loads(encode_error(NoAudio("no audio here"), utterance_id="u"))
    assert error == {
        "type": "error",
        "id": "u",
        "code": "no_audio",
        "message": "no audio here",
        "partial": False,
    }
    internal = orjson.loads(encode_error(KeyError("secret detail"), utterance_id=None))
    assert internal["code"] == "internal"
    assert "secret" not in internal["message"]
    partial = orjson.loads(encode_error(NoAudio("broke"), utterance_id="u", partial=True))
    assert "partial" in partial["message"]
    assert partial["partial"] is True and "for" not in partial


def test_a_refusal_says_which_message_it_refuses() -> None:
    """An error refusing a message carries ``for`` and no ``partial``: it ends no utterance."""
    refusal = orjson.loads(
        encode_error(InvalidParameter("in use"), utterance_id="u", refused="speak")
    )
    assert refusal["for"] == "speak" and "partial" not in refusal
    for frame, expected in [
        ('{"type":"speak","id":"x"}', "speak"),
        ('{"type":"cancel","id":5}', "cancel"),
        ('{"type":"sing","id":"x"}', "unknown"),
        ('{"id":"x"}', "unknown"),
        ("[1]", "unknown"),
    ]:
        with pytest.raises(ClientError) as raised:
            parse_client_message(frame, max_text_length=10, make_id=lambda: "made")
        assert raised.value.message_type == expected, frame


@pytest.mark.parametrize(
    ("voice", "taken"), [("", None), ("  ", None), (" en-US-AriaNeural ", "en-US-AriaNeural")]
)
def test_a_voice_is_trimmed_and_an_empty_one_is_the_default(voice: str, taken: str | None) -> None:
    """The voice rule of every door: spaces around a name are dropped (a list split on
    commas sends " echo"), and an empty name means the server's default voice."""
    message = parse({"type": "speak", "id": "u1", "text": "x", "voice": voice})
    assert isinstance(message, Speak) and message.voice == taken
