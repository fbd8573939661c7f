"""Text as LLMs write it, made into speech: Markdown and emoji left out (pure; no I/O).

An LLM's reply arrives as Markdown (``## Results``, ``**bold**``, lists, links,
code, tables) with emoji; a voice reading it as written says "asterisk" or
"grinning face". With ``TEXT_CLEANUP=markdown`` (the default; ``"cleanup"`` per
request) what is markup, not speech, is left out before synthesis:

- Heading marks (``#`` to ``######``), blockquote marks (``>``), list bullets
  (``-``, ``*``, ``+``, ``•``, with a task box ``[ ]``/``[x]``), thematic breaks
  and setext underlines (``---``, ``***``, ``===``).
- A numbered item keeps its number; its ``.`` or ``)`` becomes ``:`` ("1: Install"),
  so that it is read as a count, not as an ordinal ("1." is "erstens" in German)
  nor a sentence end.
- A heading, list item or table row that ends without punctuation gets a period,
  so that the voice pauses where the reader's eye does.
- Emphasis marks: a run of ``*``, ``_`` or ``~~`` touching a word is dropped; one
  between spaces (``2 * 3``) is kept, as is ``_`` or ``~`` inside a word
  (``snake_case``) and ``*`` between digits (``2*3``).
- Code: backticks are dropped and an inline code span's content is kept (mostly
  a name: ``pip``, ``config.py``); a fenced code block (````` ``` ````` or ``~~~``)
  is dropped whole, content included: read aloud, code is a string of symbol
  names nobody can follow. An unclosed fence runs to the end of the text, as in
  CommonMark. (Indented code blocks are not recognised: LLMs indent nested lists.)
- Links keep their text and drop their target (``[the docs](https://…)`` → "the
  docs"); an image keeps its alt text. A bare URL (``https://…``, ``www.…``) is
  replaced by its host name without ``www.`` ("example.com"): where a link
  points is worth hearing, its path and query are not.
- Tables: the leading and trailing pipes are dropped, a pipe between cells
  becomes a comma ("Name, Age."), and the delimiter row (``|---|:--:|``) goes.
- HTML tags and comments are dropped (a tag between two words leaves a space);
  HTML entities are decoded (``&amp;`` → ``&``); a backslash escape gives its
  character as text.
- Emoji are dropped (every ``Extended_Pictographic`` code point, with skin
  tones, flags, keycaps, ZWJ sequences and variation selectors): their names are
  not what the writer meant to be heard.

The cleaned text is what is synthesized, by Edge or the offline voice, and
cached (the cache key is the cleaned text's). :class:`~ttsstream.engines.words.CharMap`
records where each of its characters came from, so that word events keep
``char_start``/``char_end`` into the text the client sent.

Streaming: :class:`MarkdownCleaner` takes text in pieces (``feed``) and gives
the cleaned text decided so far, holding back at most a construct whose end has
not come yet (a URL, a tag, a link target, a run of ``*`` whose next character
decides it, a line's first characters). Block state (inside a code fence, at a
line start, in a table row) carries over from piece to piece, so the cleaned
text does not depend on where the text was split, except that a ``flush``
decides what is held as if the text ended there. What is held is at most
:data:`MAX_CONSTRUCT_CHARS` characters and a run of marks, and each piece costs
time linear in it and in what is held.

Written by hand: markdown-it-py and mistune parse whole documents into trees
whose inline content carries no character offsets (markdown-it-py maps block
tokens to line ranges only, mistune to nothing), so neither could say which
characters of the original a spoken word came from, and a reply streamed in
pieces would be parsed again on every piece. The rules LLMs use are few and
local; this scanner is one pass with bounded look-ahead. The ``regex`` module
gives the ``Extended_Pictographic`` property (``re`` has no Unicode
properties) and partial matches: a construct that may still complete at the
end of the text so far is held, not guessed.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field

import regex

from ttsstream.config import CLEANUP_MODES
from ttsstream.engines.base import SynthesisRequest
from ttsstream.engines.words import CharMap

__all__ = [
    "CLEANUP_MODES",
    "MAX_CONSTRUCT_CHARS",
    "CleanedRequest",
    "MarkdownCleaner",
    "clean",
    "speakable",
]

# Limits
#: Longest URL, link target, HTML tag or comment recognised, in characters; a
#: longer one is taken as text. It bounds what a stream holds back.
MAX_CONSTRUCT_CHARS = 2048
#: Longest run of one mark (``*``, spaces before a pipe…) taken as one.
_RUN = 64

_N = MAX_CONSTRUCT_CHARS
#: Whitespace within a line.
_SP = r"[^\S\n]"
_PICTOGRAPHS = r"\p{Extended_Pictographic}\p{Emoji_Modifier}\p{Regional_Indicator}"
#: What joins or decorates emoji: ZWJ, variation selectors, the keycap, tag characters.
_EMOJI_PARTS = r"\u200d\ufe0e\ufe0f\u20e3\U000E0020-\U000E007F"

#: What may start a construct within a line (the earliest is handled first); in a
#: table row, a pipe takes the whitespace before it.
_SPECIAL, _ROW_SPECIAL = (
    regex.compile(
        rf"""
      (?P<newline>\n)
    | (?P<escape>\\)
    | (?P<ticks>`{{1,{_RUN}}})
    | (?P<emphasis>\*{{1,{_RUN}}}|_{{1,{_RUN}}}|~{{1,{_RUN}}})
    | (?P<image>!\[)
    | (?P<open>\[)
    | (?P<close>\])
    | (?P<angle><)
    | (?P<entity>&)
    | (?P<pipe>{pipe})
    | (?P<url>(?<![\w/.@:-])(?:https?://|www\.))
    | (?P<emoji>[{_PICTOGRAPHS}][{_PICTOGRAPHS}{_EMOJI_PARTS}]{{0,{_RUN}}}
               |(?<=[{_PICTOGRAPHS}{_EMOJI_PARTS}])[{_EMOJI_PARTS}]{{1,{_RUN}}}
               |[\ufe0e\ufe0f\u20e3\U000E0020-\U000E007F]{{1,{_RUN}}})
    """,
        regex.VERBOSE,
    )
    for pipe in (r"\|", rf"{_SP}{{0,{_RUN}}}\|")
)

#: A line that is markup whole: a code fence, a thematic break or setext
#: underline, a table's delimiter row. Tried first, and waited for (its line's
#: end decides it), so that "- - -" is no bullet and "|---|" no row, however
#: the text was split.
_WHOLE_LINE = regex.compile(
    rf"""
    {_SP}{{0,{_RUN}}}
    (?:
      (?P<fence>`{{3,{_RUN}}}|~{{3,{_RUN}}})[^\n`]{{0,256}}
    | (?P<rule>(?:[-*_=]{_SP}{{0,8}}){{3,256}})
    | (?P<delimiters>\|?(?:{_SP}{{0,8}}:?-{{1,{_RUN}}}:?{_SP}{{0,8}}\|){{1,{_RUN}}}
                     (?:{_SP}{{0,8}}:?-{{1,{_RUN}}}:?{_SP}{{0,8}})?)
    )
    (?=\n|\Z)
    """,
    regex.VERBOSE,
)
#: What a line may start with (after any indentation).
_LINE_START = regex.compile(
    rf"""
    {_SP}{{0,{_RUN}}}
    (?:
      (?P<quote>>{_SP}?)
    | (?P<heading>\#{{1,6}})(?:{_SP}{{1,{_RUN}}}|(?=\n)|\Z)
    | (?P<bullet>[-+*•]){_SP}{{1,{_RUN}}}(?:\[[\ xX]\](?:{_SP}{{1,{_RUN}}}|(?=\n)|\Z))?
    | (?P<number>[0-9]{{1,9}})(?P<mark>[.)])(?={_SP}|\n|\Z)
    | (?P<row>\|)
    )
    """,
    regex.VERBOSE,
)
_FENCE_CLOSE = regex.compile(
    rf"{_SP}{{0,{_RUN}}}(?P<marker>`{{3,{_RUN}}}|~{{3,{_RUN}}}){_SP}*(?=\n|\Z)"
)

#: A link's target, from its ``(``: a destination (maybe in ``<>``), maybe a title.
_TARGET = regex.compile(
    rf"""
    \(
    {_SP}{{0,16}}
    (?:<[^<>\n]{{0,{_N}}}>
      |(?:[^()\s\\]|\\.|\((?:[^()\s\\]|\\.){{0,{_N}}}\)){{0,{_N}}})
    (?:{_SP}{{1,16}}(?:"[^"\n]{{0,{_N}}}"|'[^'\n]{{0,{_N}}}'|\([^()\n]{{0,{_N}}}\)))?
    {_SP}{{0,16}}
    \)
    """,
    regex.VERBOSE,
)

_URL = regex.compile(rf"[^\s<>]{{0,{_N}}}")
#: An autolink: a URL in angle brackets.
_AUTOLINK = regex.compile(rf"<(?P<url>https?://[^\s<>]{{1,{_N}}})>")
#: An HTML tag (open or closing) or comment, as CommonMark's raw HTML.
_TAG = regex.compile(
    rf"""
    <(?:
      [A-Za-z][A-Za-z0-9-]{{0,63}}
      (?:\s{{1,16}}[A-Za-z_:][A-Za-z0-9_.:-]{{0,63}}
         (?:\s{{0,16}}=\s{{0,16}}(?:[^\s"'=<>`]{{1,{_N}}}|'[^']{{0,{_N}}}'|"[^"]{{0,{_N}}}"))?
      ){{0,32}}
      \s{{0,16}}/?
    | /[A-Za-z][A-Za-z0-9-]{{0,63}}\s{{0,16}}
    | !--(?:[^-]|-(?!->)){{0,{_N}}}--
    )>
    """,
    regex.VERBOSE,
)
_ENTITY = regex.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
#: What a URL does not end with (GitHub's autolink rule), besides unbalanced brackets.
_URL_TRAILING = frozenset("?!.,:;*_~'\"")
#: Punctuation that already ends a heading, list item or table row.
_ENDS = frozenset(".!?:;,…。！？")
#: What a backslash escapes: ASCII punctuation.
_ESCAPABLE = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclass(frozen=True, slots=True)
class CleanedRequest(SynthesisRequest):
    """A synthesis request made from a client's text: ``text`` is that text after its
    cleanup, what is spoken and what the cache key is made of. Engines see a
    :class:`SynthesisRequest`; the core moves word ranges back with :attr:`source`."""

    #: How the text was cleaned (one of :data:`CLEANUP_MODES`; a streamed text's
    #: pieces are cleaned alike). Not part of what is said: ``text`` is.
    cleanup: str = field(default="none", compare=False)
    #: Where each character of ``text`` came from in the client's text; ``None`` when
    #: ``text`` is the client's text as it was sent.
    source: CharMap | None = field(default=None, compare=False, repr=False)

    @property
    def original_length(self) -> int:
        """Characters of the text as the client sent it."""
        return len(self.text) if self.source is None else self.source.original_length


def clean(text: str, mode: str) -> tuple[str, CharMap | None]:
    """The text to speak for ``text`` in ``mode`` (one of :data:`CLEANUP_MODES`), and
    where its characters came from; ``None`` when it is ``text`` itself."""
    if mode == "none":
        return text, None
    if len(text) > CLEAN_MEMO_MAX_LENGTH:
        return _markdown.__wrapped__(text)
    return _markdown(text)


#: Texts whose cleanup :func:`clean` remembers (the most recently asked), if no longer
#: than CLEAN_MEMO_MAX_LENGTH characters: a 5,000-character text's map can hold 450 KB,
#: and anyone connected can send 256 of them (the memo pays for sentences replayed).
CLEAN_MEMO_TEXTS = 256
CLEAN_MEMO_MAX_LENGTH = 1000


@functools.lru_cache(maxsize=CLEAN_MEMO_TEXTS)
def _markdown(text: str) -> tuple[str, CharMap | None]:
    """:func:`clean` in ``markdown`` mode, memoised: a text asked again (a cached replay)
    is not scanned again (15 µs for a sentence, bench/NOTES.md). The map is complete
    once made and only read."""
    cleaner = MarkdownCleaner()
    cleaned = cleaner.feed(text, final=True)
    if cleaned == text:
        return text, None
    return cleaned, cleaner.map


def speakable(text: str) -> bool:
    """Whether ``text`` has something to say: a character that is neither whitespace nor
    a control character (as a request's text must have; the voices read symbols)."""
    first = text[:1]
    if first and first.isprintable() and not first.isspace():
        return True  # most texts: no generator to make
    return any(char.isprintable() and not char.isspace() for char in text)


class MarkdownCleaner:
    """Clean one text given in pieces (see the module); :attr:`map` grows with it."""

    def __init__(self) -> None:
        #: Where each character given so far came from in the text fed.
        self.map = CharMap()
        #: Text fed but not yet decided (a construct whose end has not come).
        self._held = ""
        #: The character before ``_held`` (a newline at the start of the text).
        self._context = "\n"
        #: Where ``_held`` starts in the text fed.
        self._base = 0
        self._line_start = True
        #: Inside a fenced code block: its marker's character and length.
        self._fence: tuple[str, int] | None = None
        #: The line is a heading, list item or table row (it ends with a period).
        self._block_line = False
        #: The line is a table row (a pipe separates cells).
        self._row = False
        #: The last character given on this line that is not whitespace.
        self._last = ""
        #: On a heading, list item or table row: whitespace not given yet (where it
        #: starts in the text fed, and it), given before the next character, or dropped
        #: at the line's end so that its period follows its last word ("Title ☀️").
        self._spaces: list[tuple[int, str]] = []
        self._out: list[str] = []

    @property
    def held(self) -> int:
        """Characters fed but not yet decided (a construct whose end has not come)."""
        return len(self._held)

    def feed(self, text: str = "", *, final: bool = False) -> str:
        """Add ``text``; the cleaned text decided now. With ``final``, decide what is
        held as if the text ended here (more may follow: ``flush``)."""
        buf = self._context + self._held + text
        self.map.original_length += len(text)
        self._out = []
        position = 1
        while position < len(buf):
            if self._fence is not None:
                after = self._in_fence(buf, position, final)
            elif self._line_start:
                after = self._line(buf, position, final)
            else:
                after = self._inline(buf, position, final)
            if after is None:  # held until more text comes
                break
            position = after
        self._base += position - 1
        self._held = buf[position:]
        self._context = buf[position - 1]
        cleaned = "".join(self._out)
        self._out = []
        return cleaned

    # What is given

    def _copy(self, buf: str, start: int, end: int) -> None:
        """Give ``buf[start:end]`` as it is (on a block line, its trailing whitespace
        once something follows it)."""
        if start >= end:
            return
        piece = buf[start:end]
        body = piece.rstrip() if self._block_line else piece
        if body:
            self._give_spaces()
            self._out.append(body)
            self.map.copy(self._base + start - 1, len(body))
            if stripped := body.rstrip():
                self._last = stripped[-1]
        if len(body) < len(piece):
            self._spaces.append((self._base + start - 1 + len(body), piece[len(body) :]))

    def _put(self, text: str, start: int, end: int) -> None:
        """Give ``text`` for ``buf[start:end]``."""
        self._give_spaces()
        self._out.append(text)
        self.map.stand_for(self._base + start - 1, self._base + end - 1, len(text))
        if stripped := text.rstrip():
            self._last = stripped[-1]

    def _give_spaces(self) -> None:
        for source, spaces in self._spaces:
            self._out.append(spaces)
            self.map.copy(source, len(spaces))
        self._spaces.clear()

    # The scanner's states

    def _in_fence(self, buf: str, at: int, final: bool) -> int | None:
        """Inside a code block: drop lines up to its closing fence."""
        assert self._fence is not None
        if self._line_start:
            close = _FENCE_CLOSE.match(buf, at, partial=not final)
            if close is not None and (close.partial or (close.end() == len(buf) and not final)):
                return None
            if close is not None:
                marker = close.group("marker")
                if marker[0] == self._fence[0] and len(marker) >= self._fence[1]:
                    self._fence = None
                    self._line_start = False
                    return close.end()
        newline = buf.find("\n", at)
        self._line_start = newline >= 0
        return len(buf) if newline < 0 else newline + 1

    def _line(self, buf: str, at: int, final: bool) -> int | None:
        """At a line's start: its block marks."""
        for pattern in (_WHOLE_LINE, _LINE_START):
            match = pattern.match(buf, at, partial=not final)
            if match is not None and (match.partial or (match.end() == len(buf) and not final)):
                return None
            if match is not None:
                break
        else:
            self._line_start = False
            return at
        kind = next(name for name, value in match.groupdict().items() if value is not None)
        if kind == "quote":
            return match.end()  # still at the line's start: "> - item"
        self._line_start = False
        if kind == "fence":
            marker = match.group("fence")
            self._fence = (marker[0], len(marker))
        elif kind == "number":
            self._copy(buf, match.start("number"), match.end("number"))
            self._put(":", match.start("mark"), match.end("mark"))
            self._block_line = True
        elif kind == "row":
            self._block_line = self._row = True
        elif kind in ("heading", "bullet"):
            self._block_line = True
        return match.end()

    def _inline(self, buf: str, at: int, final: bool) -> int | None:
        """Within a line: plain text up to the next construct, then the construct."""
        special = _ROW_SPECIAL if self._row else _SPECIAL
        match = special.search(buf, at, partial=not final)
        size = len(buf)
        if match is None or (match.partial and match.start() == size):
            self._copy(buf, at, size)
            return size
        start = match.start()
        if start > at:  # plain text first (the construct may be held: it starts anew)
            self._copy(buf, at, start)
            return start
        if match.partial:
            return None
        end = match.end()
        kind = match.lastgroup
        if kind == "newline":
            self._spaces.clear()  # a line's trailing whitespace is no speech
            if self._block_line and self._last and self._last not in _ENDS:
                self._put(".", start, end)
            self._block_line = self._row = False
            self._copy(buf, start, end)
            self._line_start = True
            self._last = ""
            return end
        if kind == "escape":
            if end == size:
                return end if final else None
            escaped = buf[end]
            if escaped in _ESCAPABLE:
                self._copy(buf, end, end + 1)
                return end + 1
            if escaped != "\n":  # a backslash before a newline is a line break
                self._copy(buf, start, end)
            return end
        if kind == "emphasis":
            return self._emphasis(buf, start, end, final)
        if kind == "close":
            return self._link_end(buf, start, end, final)
        if kind == "angle":
            return self._angle(buf, start, final)
        if kind == "entity":
            return self._entity(buf, start, final)
        if kind == "pipe":
            return self._pipe(buf, start, end, final)
        if kind == "url":
            return self._url(buf, start, final)
        # ticks, image, open, emoji: dropped
        return end

    # Constructs within a line

    def _emphasis(self, buf: str, start: int, end: int, final: bool) -> int | None:
        """A run of ``*``, ``_`` or ``~``: dropped when it is emphasis (see the module)."""
        if end == len(buf) and not final:
            return None  # the next character decides
        run = buf[start:end]
        before = buf[start - 1]
        after = buf[end] if end < len(buf) else "\n"
        kept = (
            (run == "~")
            or (before.isspace() and after.isspace())
            or (run[0] in "_~" and before.isalnum() and after.isalnum())
            or (run[0] == "*" and before.isdigit() and after.isdigit())
        )
        if kept:
            self._copy(buf, start, end)
        return end

    def _link_end(self, buf: str, start: int, end: int, final: bool) -> int | None:
        """A ``]``: dropped, with the link's target when one follows."""
        if end == len(buf):
            return end if final else None
        if buf[end] != "(":
            return end
        target = _TARGET.match(buf, end, partial=not final)
        if target is None:
            return end
        if target.partial:
            return None
        return target.end()

    def _angle(self, buf: str, start: int, final: bool) -> int | None:
        """A ``<``: an autolink (its host), an HTML tag or comment (dropped), or text."""
        matches = [pattern.match(buf, start, partial=not final) for pattern in (_AUTOLINK, _TAG)]
        whole = [m for m in matches if m is not None and not m.partial]
        if not whole:
            if any(m is not None for m in matches):
                return None
            self._copy(buf, start, start + 1)
            return start + 1
        match = whole[0]
        end = match.end()
        if match.re is _AUTOLINK:
            self._host(buf, match.start("url"), match.end("url"))
            return end
        if end == len(buf) and not final:
            return None  # the next character says whether a space stands for it
        after = buf[end] if end < len(buf) else "\n"
        if not buf[start - 1].isspace() and not after.isspace():
            self._put(" ", start, end)  # "one<br>two"
        return end

    def _entity(self, buf: str, start: int, final: bool) -> int | None:
        """A ``&``: an HTML entity (decoded), or text."""
        match = _ENTITY.match(buf, start, partial=not final)
        if match is not None and match.partial:
            return None
        if match is not None:
            decoded = html.unescape(match.group())
            if decoded != match.group():
                self._put(decoded, start, match.end())
                return match.end()
        self._copy(buf, start, start + 1)
        return start + 1

    def _pipe(self, buf: str, start: int, end: int, final: bool) -> int | None:
        """A ``|`` (in a row, with the whitespace before it): a comma between cells,
        nothing at the row's end."""
        if not self._row:
            self._copy(buf, start, end)
            return end
        rest, limit = end, min(len(buf), end + _RUN)
        while rest < limit and buf[rest] != "\n" and buf[rest].isspace():
            rest += 1
        if rest == len(buf) and not final:
            return None  # the row's last pipe, or another cell?
        if rest == len(buf) or buf[rest] == "\n":
            return rest
        self._put(",", end - 1, end)
        return end

    def _url(self, buf: str, start: int, final: bool) -> int | None:
        """A bare URL: its host name (see the module)."""
        match = _URL.match(buf, start)
        assert match is not None
        end = match.end()
        if end == len(buf) and not final:
            return None  # it may go on
        while end > start:
            last = buf[end - 1]
            if last in _URL_TRAILING:
                end -= 1
            elif last in ")]":
                url = buf[start:end]
                opener = "(" if last == ")" else "["
                if url.count(opener) >= url.count(last):
                    break
                end -= 1
            else:
                break
        self._host(buf, start, end)
        return end

    def _host(self, buf: str, start: int, end: int) -> None:
        """Give the host name of the URL ``buf[start:end]``."""
        for prefix in ("https://", "http://", "www."):
            if buf.startswith(prefix, start, end):
                start += len(prefix)
        host_end = start
        while host_end < end and buf[host_end] not in "/?#:@":
            host_end += 1
        self._copy(buf, start, host_end)
