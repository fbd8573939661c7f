"""Text cleanup: Markdown and emoji left out before synthesis, word ranges kept in
the text the client sent (the pure cleaner, then through the core and the server)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Client, ServerFactory, connected, wait_for_entries
from tests.fake_edge import FakeEdge, spoken_words
from ttsstream.audio.formats import MP3
from ttsstream.config import load_config
from ttsstream.core.cleanup import MAX_CONSTRUCT_CHARS, MarkdownCleaner, clean
from ttsstream.core.context import ANONYMOUS, RequestContext
from ttsstream.core.router import Started
from ttsstream.core.utterance import Summary
from ttsstream.engines.base import WordEvent
from ttsstream.engines.words import CharMap, WordLocator, tokens_of
from ttsstream.exceptions import ClientError, ConfigError

# Replies as LLMs write them.
SETUP = """## Getting started

Here's how to set it up **in three steps**:

1. Install the package with `pip install ttsstream`.
2. Copy `.env.example` to `.env` and set `DEFAULT_VOICE`.
3. Run `ttsstream serve` — that's it! 🎉

> **Note:** the offline voice needs the `local` extra.

See the [deployment guide](https://github.com/example/ttsstream/blob/main/docs/x.md) for nginx.
"""

COMPARISON = """### Comparison

| Engine | Latency | Offline |
|--------|--------:|:-------:|
| Edge   | 300 ms  | no      |
| eSpeak | 20 ms   | yes     |

*Edge* sounds far better, but ~~it needs~~ it needs the internet. 😅
"""

CODE = """Sure! Here is a Python example:

```python
import asyncio
print("hello")  # **not** spoken
```

The `asyncio.run()` call starts the loop. Learn more at https://docs.python.org/3/library/asyncio.html.
"""

WEATHER = """# Weather today ☀️

- **Morning:** sunny, 18 °C
- **Afternoon:** clouds, maybe rain 🌧️
  - bring an umbrella
* Evening: <b>windy</b><br>stay inside

Have a great day! 👋😊
"""

REPLIES = [SETUP, COMPARISON, CODE, WEATHER]

_EMOJI = regex.compile(r"[\p{Extended_Pictographic}\ufe0f\u200d]")
#: What must not be left in a cleaned reply.
_MARKUP = ("**", "`", "#", "](", "http", "www.", "|", "<b>", "<br>", "~~", "- ")


def cleaned(text: str) -> str:
    return clean(text, "markdown")[0]


# The rules, one by one


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        # Headings and quotes; a block line without punctuation ends with a period.
        ("## Results\nThey are in.", "Results.\nThey are in."),
        ("# Done!\nYes", "Done!\nYes"),
        ("> ## Quoted heading\n> text", "Quoted heading.\ntext"),
        ("#hashtag stays", "#hashtag stays"),
        # Emphasis
        ("**Bold claim** and *this* and __that__ and _it_", "Bold claim and this and that and it"),
        ("***both*** and ~~struck~~", "both and struck"),
        (
            "2 * 3 = 6, 2*3 too, snake_case, a~b, ~5 min",
            "2 * 3 = 6, 2*3 too, snake_case, a~b, ~5 min",
        ),
        ("un*believ*able", "unbelievable"),
        # Lists
        ("- Apples\n- Pears.\n+ Plums\n* Figs\n• Kiwis", "Apples.\nPears.\nPlums.\nFigs.\nKiwis"),
        ("1. Install\n2) Configure it.\n10. Run", "1: Install.\n2: Configure it.\n10: Run"),
        ("- [x] done\n- [ ] to do", "done.\nto do"),
        ("  - nested\n    1. deeper", "nested.\n1: deeper"),
        (
            "-5 °C, 3.14 at a line's start\n2024 was a year",
            "-5 °C, 3.14 at a line's start\n2024 was a year",
        ),
        # Code
        ("Run `pip install ttsstream` now.", "Run pip install ttsstream now."),
        ("Code:\n```python\nprint('hi')\n```\nDone.", "Code:\n\nDone."),
        ("~~~\nx = 1\n~~~\nAfter.", "\nAfter."),
        ("```\nnever closed\nall gone", ""),
        ("````\n```\nstill code\n````\nout", "\nout"),
        # Links, images, URLs
        ("See [the docs](https://example.com/a_(b) 'Title').", "See the docs."),
        ("![a chart](chart.png) here", "a chart here"),
        (
            "At https://www.example.com/path?q=1#x, or http://localhost:8080/.",
            "At example.com, or localhost.",
        ),
        (
            "Visit www.github.com/org. Or <https://docs.python.org/3/>!",
            "Visit github.com. Or docs.python.org!",
        ),
        ("(see https://en.wikipedia.org/wiki/Foo_(bar))", "(see en.wikipedia.org)"),
        ("[https://x.com/a](https://x.com/a)", "x.com"),
        ("example.com stays", "example.com stays"),
        # Tables
        ("| Name | Age |\n|---|:--:|\n| Ann | 30 |", " Name, Age.\n\n Ann, 30"),
        ("a | b outside a table", "a | b outside a table"),
        # HTML
        ("<b>bold</b> one<br>two <!-- hidden --> x", "bold one two  x"),
        ("a < b and x<3", "a < b and x<3"),
        ("AT&amp;T &lt;3 &#x41; &unknown; R&D", "AT&T <3 A &unknown; R&D"),
        ("\\*not emphasis\\* C:\\Users", "*not emphasis* C:\\Users"),
        # Thematic breaks
        ("Above\n\n---\n\nBelow\n* * *\nEnd\n===", "Above\n\n\n\nBelow\n\nEnd\n"),
        # Emoji
        ("Great 😀 job 👍🏽 in 🇫🇷 👨‍👩‍👧 ❤️ ©", "Great  job  in    "),
        ("1️⃣ first", "1 first"),
        # Nothing to do
        ("Plain text, nothing to do.", "Plain text, nothing to do."),
    ],
)
def test_markup_is_left_out(text: str, spoken: str) -> None:
    """Each construct is spoken as the rules say (docs/protocol.md, Text cleanup)."""
    assert cleaned(text) == spoken


def test_a_whole_reply_as_spoken() -> None:
    """An LLM's setup guide is read as a person would say it."""
    assert cleaned(SETUP) == (
        "Getting started.\n\n"
        "Here's how to set it up in three steps:\n\n"
        "1: Install the package with pip install ttsstream.\n"
        "2: Copy .env.example to .env and set DEFAULT_VOICE.\n"
        "3: Run ttsstream serve — that's it!\n\n"
        "Note: the offline voice needs the local extra.\n\n"
        "See the deployment guide for nginx.\n"
    )


def test_none_speaks_the_text_as_it_is() -> None:
    """Cleanup "none" changes nothing and needs no map; neither does a plain text."""
    assert clean(SETUP, "none") == (SETUP, None)
    assert clean("Just words.", "markdown") == ("Just words.", None)


@pytest.mark.parametrize("reply", REPLIES)
def test_replies_lose_their_markup_and_keep_their_words(reply: str) -> None:
    """No mark, link target, code, tag or emoji is left, and the words are."""
    spoken = cleaned(reply)
    for mark in _MARKUP:
        assert mark not in spoken
    assert not _EMOJI.search(spoken)
    assert "import" not in spoken and "print" not in spoken  # code blocks go whole
    for words in ("in three steps", "deployment guide", "sounds far better", "bring an umbrella"):
        if words in reply:
            assert words in spoken
    if "docs.python.org" in reply:
        assert "docs.python.org" in spoken


# Words land on the characters the client sent


def highlights(original: str) -> list[tuple[str, str]]:
    """Each word the upstream would report for the cleaned ``original``, with the slice
    of ``original`` its range points at (as a page would highlight it)."""
    spoken, source = clean(original, "markdown")
    assert source is not None and source.length == len(spoken)
    locator = WordLocator(spoken)
    pairs = []
    for word in spoken_words(spoken):
        event = source.in_original(WordEvent(word, 0.0, 0.0, *locator.locate(word)))
        assert event.char_start is not None and event.char_end is not None, word
        pairs.append((word, original[event.char_start : event.char_end]))
    return pairs


@pytest.mark.parametrize("reply", REPLIES)
def test_word_highlights_land_on_the_original_characters(reply: str) -> None:
    """Slicing the reply as sent with each word's range gives text holding that word."""
    pairs = highlights(reply)
    assert len(pairs) > 10
    for word, shown in pairs:
        assert word in shown, (word, shown)


def test_highlights_are_the_words_themselves_not_their_marks() -> None:
    """A bold word, a link's text, a list number and a URL's host are highlighted alone."""
    text = "1. **Bold** [link](https://x.org/a) and https://www.example.com/path"
    assert highlights(text) == [
        ("1", "1"),
        ("Bold", "Bold"),
        ("link", "link"),
        ("and", "and"),
        ("example.com", "example.com"),
    ]


def test_offline_voice_words_land_on_the_original_characters() -> None:
    """eSpeak's words (one per token of the cleaned text) map back the same way."""
    for reply in REPLIES:
        spoken, source = clean(reply, "markdown")
        assert source is not None
        for token in tokens_of(spoken):
            span = source.original(token.start, token.end)
            assert span is not None
            assert token.text in reply[span[0] : span[1]]


# Streamed text: the same rules whatever the pieces


def pieces_of(text: str, cuts: Sequence[int]) -> list[str]:
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def streamed(pieces: Sequence[str]) -> tuple[str, CharMap]:
    cleaner = MarkdownCleaner()
    spoken = "".join(cleaner.feed(piece) for piece in pieces) + cleaner.feed(final=True)
    return spoken, cleaner.map


def assert_same_cleanup(text: str, pieces: Sequence[str]) -> None:
    whole = MarkdownCleaner()
    expected = whole.feed(text, final=True)
    spoken, source = streamed(pieces)
    assert spoken == expected, pieces
    assert source.length == len(spoken)
    for index in range(len(spoken)):
        assert source.original(index, index + 1) == whole.map.original(index, index + 1)


def test_a_construct_split_across_pieces_is_cleaned_as_one() -> None:
    """``**bold`` then ``text**`` is "bold text"; a fence, a link, a URL and a table
    split mid-construct are cleaned as if whole."""
    assert streamed(["This is **bold", " text** here."])[0] == "This is bold text here."
    assert streamed(["See [the docs](https://exa", "mple.com/a) now"])[0] == "See the docs now"
    assert streamed(["Go to https://www.exam", "ple.com/path now"])[0] == "Go to example.com now"
    assert streamed(["Code:\n``", "`\nx = 1\n`", "``\nDone."])[0] == "Code:\n\nDone."
    assert streamed(["| a | b |\n|--", "-|---|\n| 1 | 2 |"])[0] == " a, b.\n\n 1, 2"
    assert streamed(["one 👨\u200d", "👩\u200d👧 two"])[0] == "one  two"


@settings(max_examples=200, deadline=None)
@given(
    reply=st.sampled_from(REPLIES),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_a_reply_split_anywhere_is_cleaned_as_whole(reply: str, cuts: list[int]) -> None:
    """However a reply arrives in pieces, its cleaned text and map are the whole one's."""
    assert_same_cleanup(reply, pieces_of(reply, cuts))


_ATOMS = [
    *"ab 1.\n*_~`#-+|>[]()!<&;:/\\h",
    "https://",
    "www.",
    "😀",
    "\u200d",
    "\ufe0f",
    "&amp;",
    "<b>",
    "</b>",
    "```",
    "| ",
    "- ",
    "1. ",
    "## ",
    "<!--",
    "-->",
    "](",
    "x.com",
    "é",
]


@settings(max_examples=500, deadline=None)
@given(
    atoms=st.lists(st.sampled_from(_ATOMS), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_markdown_like_text_split_anywhere_is_cleaned_as_whole(
    atoms: list[str], cuts: list[int]
) -> None:
    """Split invariance holds for texts made of every construct's pieces, too."""
    text = "".join(atoms)
    assert_same_cleanup(text, pieces_of(text, cuts))


@pytest.mark.parametrize(
    ("opening", "filler"),
    [
        ("[link](", "a"),  # a link target that never closes
        ("see https://", "a"),  # a URL that goes on
        ("<a href='", "b"),  # a tag that never ends
        ("<!--", "c"),  # a comment that never ends
        ("| a |", " " * 63 + "b"),  # a row's pipes followed by many spaces
    ],
)
def test_what_is_held_back_is_bounded(opening: str, filler: str) -> None:
    """A construct whose end does not come is held at most MAX_CONSTRUCT_CHARS
    characters (and a run of marks), then let go: a stream never waits on it for ever."""
    cleaner = MarkdownCleaner()
    spoken = cleaner.feed(opening)
    for _ in range(3 * MAX_CONSTRUCT_CHARS // 64):
        spoken += cleaner.feed((filler * 64)[:64])
        assert cleaner.held <= MAX_CONSTRUCT_CHARS + 64
    assert len(spoken) > MAX_CONSTRUCT_CHARS  # what was let go is spoken as text


# Through the core and the server


async def test_requests_are_cleaned_as_asked(start_server: ServerFactory) -> None:
    """The request's text is the cleaned one by default, the sent one with "none"; the
    default follows TEXT_CLEANUP; texts differing only in markup share a cache key."""
    server = await start_server()
    utterances, speech = server.services.utterances, server.services.speech
    marked = utterances.request(text="**Hello** 😀 world", voice=None)
    plain = utterances.request(text="Hello  world", voice=None)
    assert (marked.text, marked.cleanup, marked.original_length) == ("Hello  world", "markdown", 17)
    assert speech.key_of(marked) == speech.key_of(plain)
    kept = utterances.request(text="**Hello**", voice=None, cleanup="none")
    assert (kept.text, kept.source) == ("**Hello**", None)
    verbatim = await start_server(text_cleanup="none")
    assert verbatim.services.utterances.request(text="**Hi**", voice=None).text == "**Hi**"


def test_text_cleanup_is_a_setting() -> None:
    """TEXT_CLEANUP takes markdown or none, in any case; anything else names the variable."""
    assert load_config({}, env_file=None).text_cleanup == "markdown"
    assert load_config({"TEXT_CLEANUP": " None "}, env_file=None).text_cleanup == "none"
    with pytest.raises(ConfigError) as raised:
        load_config({"TEXT_CLEANUP": "html"}, env_file=None)
    assert raised.value.variable == "TEXT_CLEANUP"


async def test_a_reply_is_spoken_clean_with_its_words_on_the_text_sent(
    client: Client, fake: FakeEdge
) -> None:
    """A Markdown reply reaches Edge cleaned; each word event's range slices the reply
    as sent to text holding the word."""
    await client.speak(SETUP)
    result = await client.until_final("u1")
    assert result.final["type"] == "end"
    (record,) = fake.records
    assert record.text == cleaned(SETUP).strip()
    assert len(result.words) == len(spoken_words(record.text))
    for word in result.words:
        assert word["text"] in SETUP[word["char_start"] : word["char_end"]]


async def test_texts_that_differ_only_in_markup_are_one_cache_entry(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """The second text, the first without its markup, replays the first's entry, with
    word ranges into its own text."""
    started = await start_server()
    marked, plain = "**Bold** claim, [see](https://x.org).", "Bold claim, see."
    async with connected(started) as client:
        await client.speak(marked, id="a")
        first = await client.until_final("a")
        await wait_for_entries(started, 1)
        await client.speak(plain, id="b")
        second = await client.until_final("b")
    assert len(fake.records) == 1
    assert second.messages[0]["cached"] is True
    for text, result in ((marked, first), (plain, second)):
        assert [w["text"] for w in result.words] == ["Bold", "claim", "see"]
        for word in result.words:
            assert text[word["char_start"] : word["char_end"]] == word["text"]


async def test_nothing_left_to_say_is_empty_text(client: Client, fake: FakeEdge) -> None:
    """A text of emoji and marks only ends with empty_text; Edge is not asked."""
    await client.speak("## 🎉\n- 😀 👍")
    result = await client.until_final("u1")
    assert (result.final["type"], result.final["code"]) == ("error", "empty_text")
    assert "for" not in result.final
    assert fake.records == []


async def test_the_offline_voice_speaks_the_cleaned_text(client: Client) -> None:
    """eSpeak gets the cleaned text too; its words index the text sent."""
    text = "## Hello\n**Bold** claim 😀 [link](https://x.org)"
    await client.speak(text, voice="espeak:en-us")
    result = await client.until_final("u1")
    assert result.final["type"] == "end"
    assert [(w["text"], text[w["char_start"] : w["char_end"]]) for w in result.words] == [
        ("Hello", "Hello"),
        ("Bold", "Bold"),
        ("claim", "claim"),
        ("link", "link"),
    ]


class _Collected:
    """A sink that keeps what an utterance sent."""

    cut: ClientError | None = None
    gone = False

    def __init__(self) -> None:
        self.received: list[WordEvent] = []
        self.summary: Summary | None = None
        self.failure: BaseException | None = None

    async def start(self, started: Started) -> None:
        pass

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        pass

    async def word(self, word: WordEvent) -> None:
        self.received.append(word)

    async def words(self, words: Sequence[WordEvent]) -> None:
        self.received.extend(words)

    async def end(self, summary: Summary) -> None:
        self.summary = summary

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        self.failure = exc

    def hold(self, on: bool) -> None:
        pass

    def finished(self) -> None:
        pass


async def test_a_request_asking_for_none_is_spoken_as_sent(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Through the core's request API, cleanup "none" reaches Edge with its marks, and
    its words index it directly."""
    server = await start_server()
    utterances = server.services.utterances
    text = "**Bold** claim"
    request = utterances.request(text=text, voice=None, cleanup="none")
    await utterances.accept(request)
    sink = _Collected()
    outcome = await utterances.run(
        request,
        sink,
        audio_format=MP3,
        utterance_id="core",
        received_at=time.perf_counter(),
        context=RequestContext(ANONYMOUS, "127.0.0.1", "test", "ws"),
    )
    assert (outcome, sink.failure) == ("ok", None)
    assert fake.records[0].text == text
    assert [word.text for word in sink.received] == ["Bold", "claim"]
    for word in sink.received:
        assert word.char_start is not None and word.char_end is not None
        assert text[word.char_start : word.char_end] == word.text


_MARKED = "**Bold** claim 😀 [link](https://example.com/page)."


@pytest.mark.parametrize("door", ["ws", "ws-stream", "tts", "openai"])
async def test_every_door_takes_the_cleanup_field(
    start_server: ServerFactory, fake: FakeEdge, door: str
) -> None:
    """``cleanup`` on each door: absent cleans (TEXT_CLEANUP), ``"none"`` speaks the text
    as sent, JSON null is absent, anything else is refused as invalid_parameter."""
    server = await start_server(rate_limit_requests=0)
    base = f"http://127.0.0.1:{server.port}"
    calls = itertools.count()

    async def speak(cleanup: object, *, omit: bool = False) -> tuple[str, str]:
        """The text sent (new each time: no cache hit), and what the upstream got or the
        error code."""
        text = f"{_MARKED} Call {next(calls)}."
        fields: dict[str, Any] = {} if omit else {"cleanup": cleanup}
        before = len(fake.records)
        if door.startswith("ws"):
            async with connected(server) as client:
                stream = door == "ws-stream"
                await client.speak("" if stream else text, stream=stream, **fields)
                if stream:
                    await client.send({"type": "append", "id": "u1", "text": text})
                    await client.send({"type": "finish", "id": "u1"})
                final = (await client.until_final("u1")).final
                if final["type"] == "error":
                    return text, str(final["code"])
        else:
            path, body = (
                ("/tts", {"text": text})
                if door == "tts"
                else ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": text})
            )
            async with (
                aiohttp.ClientSession() as session,
                session.post(base + path, json={**body, **fields}) as response,
            ):
                answer = await response.read()
                if response.status != 200:
                    error = orjson.loads(answer)["error"]
                    return text, str(error["code"] if isinstance(error, dict) else error)
        assert len(fake.records) == before + 1
        return text, fake.records[-1].text

    for cleaned in (await speak(None, omit=True))[1], (await speak(None))[1]:  # null: absent
        assert "**" not in cleaned and "😀" not in cleaned and "https" not in cleaned
        assert "Bold claim" in cleaned
    sent, spoken = await speak("none")
    assert spoken == sent
    assert (await speak("html"))[1] == "invalid_parameter"
