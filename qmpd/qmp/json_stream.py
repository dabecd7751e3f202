"""Sans-IO JSON stream parser with QEMU 7.2's dialect, limits and recovery.

Bytes go in through :meth:`JSONStreamParser.feed`; whole JSON values and
parse failures come out, in input order.  Nothing here touches a socket.

The parser mirrors the three stages QEMU uses, because their interplay
decides which errors a malformed stream produces:

* a lexer (a DFA over bytes) that cuts tokens, reports stray bytes and then
  skips input until a resynchronisation byte;
* a streamer that counts braces and brackets, applies the size, count and
  nesting limits, and hands a token list to the parser whenever the depth
  returns to zero (or goes negative);
* a parser that builds the value, or reports the first error it meets.

Runs of bytes that keep the lexer in one state (string bodies, digits,
whitespace, recovery) are skipped with compiled regular expressions, and
common complete tokens are matched in one step, so input is consumed in
whole buffers at C speed rather than byte by byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
TOKEN_SIZE_EXCEEDED = "JSON token size limit exceeded"
#: Per-token cost beyond its bytes: a bytes object's header plus a list slot.
_TOKEN_OVERHEAD = 48
MAX_NESTING = 1024

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]


@dataclass(frozen=True, slots=True)
class ParseFailure:
    """A message that could not be parsed; ``desc`` is QEMU's error text."""

    desc: str


ParseResult = JSONValue | ParseFailure

# Lexer states.  Tokens are emitted on the transitions out of these.
_START = 0
_RECOVERY = 1
_DQ = 2
_DQ_ESC = 3
_SQ = 4
_SQ_ESC = 5
_ZERO = 6  # "0" or "-0"
_INT = 7  # nonzero integer digits
_NEG = 8  # "-"
_MANTISSA = 9  # after "."
_MANTISSA_DIGITS = 10
_EXP_E = 11  # after "e"/"E"
_EXP_SIGN = 12  # after "e+"/"e-"
_EXP_DIGITS = 13
_KEYWORD = 14
_WHITESPACE = 15

_STRUCTURAL = frozenset(b"{}[]:,")
_WS = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")

# Common complete tokens, matched in one step from the start state.  A
# number or keyword needs the byte after it to be known, so those branches
# demand a following byte; everything else goes through the DFA.
_FAST_TOKEN = re.compile(
    rb"""[ \t\r\n]*(?:
        ([{}\[\]:,])
      | ("(?:[^"\\\x00-\x1f\xfe\xff]|\\[\x20-\xfd])*")
      | (-?(?:0|[1-9][0-9]*)(?=[^0-9.eE]))
      | ([a-z]+(?=[^a-z]))
    )""",
    re.X,
)
# Whole-message fast path: a run of plain tokens only (ASCII strings
# without escapes, short integers, true/false/null, structure, whitespace).
# Inside such a run QEMU's parser and json.loads agree on every value, so a
# complete object found here is handed to json.loads; anything unusual
# (errors included) takes the exact token-by-token path instead.
_PLAIN_MESSAGE = re.compile(
    rb"""[ \t\r\n]*\{(?:
        [ \t\r\n{}\[\]:,]
      | "[\x20\x21\x23-\x5b\x5d-\x7e]*"
      | -?(?:0|[1-9][0-9]{0,17})(?![0-9.eE])
      | true | false | null
    )*""",
    re.X,
)
_PLAIN_STRUCTURE = re.compile(rb'[{}\[\]]|"[^"]*"')
_FAST_MESSAGE_MAX = 1 << 20
_WS_RUN = re.compile(rb"[ \t\r\n]*")
_DQ_RUN = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*')
_SQ_RUN = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_KEYWORD_RUN = re.compile(rb"[a-z]*")
# Recovery skips everything but structural bytes, control bytes other than
# tab, and the impossible UTF-8 bytes 0xFE/0xFF.
_RECOVERY_RUN = re.compile(rb"[^\x00-\x08\x0a-\x1f{}\[\]:,\xfe\xff]*")

_TOKEN_LBRACE = ord("{")
_TOKEN_RBRACE = ord("}")
_TOKEN_LBRACKET = ord("[")
_TOKEN_RBRACKET = ord("]")
_TOKEN_COLON = ord(":")
_TOKEN_COMMA = ord(",")
_BACKSLASH = 0x5C


def decode_mod_utf8(data: bytes) -> str:
    """Decode bytes as QEMU's writer does: stop at NUL, bad sequences -> U+FFFD."""
    out: list[str] = []
    i = 0
    n = len(data)
    while i < n:
        if data[i] == 0:
            break
        cp, i = _mod_utf8_codepoint(data, i, n)
        out.append("\ufffd" if cp < 0 else chr(cp))
    return "".join(out)


def _is_noncharacter(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _mod_utf8_codepoint(data: bytes, i: int, n: int) -> tuple[int, int]:
    """Decode one code point of modified UTF-8 at ``data[i]``; -1 if invalid.

    Returns the code point and the index after the bytes it consumed.
    Accepts the overlong C0 80 for U+0000 and rejects surrogates,
    noncharacters and code points beyond U+10FFFF, like QEMU.
    """
    byte = data[i]
    i += 1
    if byte < 0x80:
        return byte, i
    if byte >= 0xFE or not byte & 0x40:
        return -1, i
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = data[i] if i < n else 0
        if nxt & 0xC0 != 0x80:
            return -1, i
        i += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if cp > 0x10FFFF or _is_noncharacter(cp) or 0xD800 <= cp <= 0xDFFF:
        return -1, i
    if cp < _MIN_CODEPOINT[length - 2] and not (cp == 0 and length == 2):
        return -1, i
    return cp, i


def _run_end(pattern: re.Pattern[bytes], data: bytes, i: int) -> int:
    """End of the run ``pattern`` matches at ``data[i]`` (these always match)."""
    m = pattern.match(data, i)
    assert m is not None
    return m.end()


class _DuplicateKey(ValueError):
    pass


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _DuplicateKey
    return value


class _ParseError(Exception):
    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


_NONCHAR_RE = re.compile("[\ufdd0-\ufdef\ufffe\uffff]|[\U0001fffe-\U0010ffff]")
_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _cvt4hex(token: bytes, i: int) -> int:
    chunk = token[i : i + 4]
    if len(chunk) == 4 and all(c in _HEX for c in chunk):
        return int(chunk, 16)
    return -1


def _valid_codepoint(cp: int) -> bool:
    return 0 <= cp <= 0x10FFFF and not _is_noncharacter(cp) and not 0xD800 <= cp <= 0xDFFF


def parse_string_token(token: bytes) -> str:
    """Decode a string token (quotes included) the way QEMU's parser does."""
    body = token[1:-1]
    if b"\\" not in body:
        if body.isascii():
            return body.decode("ascii")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            # Strict UTF-8 already refuses overlongs, surrogates and values
            # past U+10FFFF; QEMU also refuses noncharacters.
            if not _NONCHAR_RE.search(text):
                return text
    return _parse_string_slow(token)


def _parse_string_slow(token: bytes) -> str:
    out: list[str] = []
    quote = token[0]
    i = 1
    n = len(token)
    while i < n and token[i] != quote:
        c = token[i]
        if c == _BACKSLASH:
            beg = i
            esc = token[i + 1]
            i += 2
            simple = _SIMPLE_ESCAPES.get(esc)
            if simple is not None:
                out.append(simple)
                continue
            if esc != ord("u"):
                raise _ParseError("invalid escape sequence in string")
            cp = _cvt4hex(token, i)
            i += 4
            if 0xD800 <= cp <= 0xDBFF and token[i : i + 2] == b"\\u":
                cp = 0x10000 + ((cp & 0x3FF) << 10)
                trailing = _cvt4hex(token, i + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp |= trailing & 0x3FF
                    i += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                shown = token[beg:i].split(b"\0", 1)[0]
                raise _ParseError(
                    f"{decode_mod_utf8(shown)} is not a valid Unicode character"
                )
            out.append(chr(cp))
        else:
            cp, i = _mod_utf8_codepoint(token, i, n)
            if cp < 0:
                raise _ParseError("invalid UTF-8 sequence in string")
            out.append(chr(cp))
    return "".join(out)


_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


def parse_number_token(token: bytes) -> int | float:
    """Integers that fit int64 or uint64 stay integers; anything else is a double."""
    if b"." in token or b"e" in token or b"E" in token:
        return float(token)
    if len(token) > 21:
        # Past uint64 anyway (JSON has no leading zeros); also keeps int()
        # away from huge digit strings.
        return float(token)
    value = int(token)
    if _INT64_MIN <= value <= _UINT64_MAX:
        return value
    return float(token)


def _parse_keyword(token: bytes) -> JSONValue:
    if token == b"true":
        return True
    if token == b"false":
        return False
    if token == b"null":
        return None
    raise _ParseError(f"invalid keyword '{decode_mod_utf8(token)}'")


# Frames of the iterative parser.
_IN_ARRAY = 0
_IN_KEY = 1
_IN_VALUE = 2


def parse_tokens(tokens: list[bytes]) -> ParseResult:
    """Parse one message's tokens; the first error wins, as in QEMU."""
    try:
        return _parse_tokens(tokens)
    except _ParseError as err:
        return ParseFailure("JSON parse error, " + err.desc)


def _parse_tokens(tokens: list[bytes]) -> JSONValue:
    n = len(tokens)
    pos = 0
    # Each frame is [kind, container, key]; the parser loops between
    # "parse a value" and "a value is done, what does its parent expect".
    stack: list[list[object]] = []
    while True:
        # --- parse a value starting at pos ---
        if pos >= n:
            raise _ParseError("premature EOI")
        tok = tokens[pos]
        first = tok[0]
        value: JSONValue
        if first == _TOKEN_LBRACE:
            pos += 1
            if pos >= n:
                raise _ParseError("premature EOI")
            if tokens[pos][0] == _TOKEN_RBRACE:
                pos += 1
                value = {}
            else:
                stack.append([_IN_KEY, {}, None])
                continue
        elif first == _TOKEN_LBRACKET:
            pos += 1
            if pos >= n:
                raise _ParseError("premature EOI")
            if tokens[pos][0] == _TOKEN_RBRACKET:
                pos += 1
                value = []
            else:
                stack.append([_IN_ARRAY, [], None])
                continue
        elif first == 0x22 or first == 0x27:
            value = parse_string_token(tok)
            pos += 1
        elif first == 0x2D or 0x30 <= first <= 0x39:
            value = parse_number_token(tok)
            pos += 1
        elif 0x61 <= first <= 0x7A:
            value = _parse_keyword(tok)
            pos += 1
        else:
            raise _ParseError("expecting value")

        # --- hand the finished value to its parent, closing containers ---
        while True:
            if not stack:
                return value
            frame = stack[-1]
            kind = frame[0]
            if kind == _IN_ARRAY:
                lst = frame[1]
                assert isinstance(lst, list)
                lst.append(value)
                if pos >= n:
                    raise _ParseError("premature EOI")
                sep = tokens[pos][0]
                pos += 1
                if sep == _TOKEN_RBRACKET:
                    stack.pop()
                    value = lst
                    continue
                if sep != _TOKEN_COMMA:
                    raise _ParseError("expected separator in list")
                break
            if kind == _IN_KEY:
                if not isinstance(value, str):
                    raise _ParseError("key is not a string in object")
                if pos >= n:
                    raise _ParseError("premature EOI")
                colon = tokens[pos][0]
                pos += 1
                if colon != _TOKEN_COLON:
                    raise _ParseError("missing : in object pair")
                frame[0] = _IN_VALUE
                frame[2] = value
                break
            # _IN_VALUE
            obj = frame[1]
            key = frame[2]
            assert isinstance(obj, dict) and isinstance(key, str)
            if key in obj:
                raise _ParseError("duplicate key")
            obj[key] = value
            if pos >= n:
                raise _ParseError("premature EOI")
            sep = tokens[pos][0]
            pos += 1
            if sep == _TOKEN_RBRACE:
                stack.pop()
                value = obj
                continue
            if sep != _TOKEN_COMMA:
                raise _ParseError("expected separator in dict")
            frame[0] = _IN_KEY
            frame[2] = None
            break


class JSONStreamParser:
    """Turns a byte stream into JSON values and parse failures, like QEMU's monitor."""

    __slots__ = (
        "_braces",
        "_brackets",
        "_out",
        "_partial",
        "_sizes",
        "_state",
        "_token_size",
        "_tokens",
        "_ws_run",
        "fast_messages",
        "max_nesting",
        "max_token_count",
        "max_token_size",
    )

    def __init__(
        self,
        max_token_size: int = MAX_TOKEN_SIZE,
        max_token_count: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
        fast_messages: bool = True,
    ) -> None:
        self._state = _START
        self._partial = bytearray()  # bytes of a token cut by a buffer end
        self._tokens: list[bytes] = []
        self._token_size = 0
        self._braces = 0
        self._brackets = 0
        self._out: list[ParseResult] = []
        self._sizes: list[int] = []
        self._ws_run = 0
        self.max_token_size = max_token_size
        self.max_token_count = max_token_count
        self.max_nesting = max_nesting
        self.fast_messages = fast_messages

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an unfinished message (tokens plus a cut token)."""
        return self._token_size + len(self._partial)

    @property
    def held_memory(self) -> int:
        """Estimated memory the unfinished message pins, object overhead included."""
        return self._token_size + len(self._partial) + _TOKEN_OVERHEAD * len(self._tokens)

    @property
    def result_sizes(self) -> list[int]:
        """For each result of the last :meth:`feed`, the memory its input held."""
        return self._sizes

    def discard_message(self) -> ParseFailure:
        """Drop the unfinished message as if it had outgrown the token size limit.

        What follows is lexed from the start state, as after QEMU forces an
        oversized token out.
        """
        self._partial.clear()
        self._state = _START
        self._clear_message()
        return ParseFailure(TOKEN_SIZE_EXCEEDED)

    def reset(self) -> None:
        """Forget everything half-read (a new connection starts clean)."""
        self._state = _START
        self._partial.clear()
        self._tokens = []
        self._token_size = 0
        self._braces = 0
        self._brackets = 0

    def feed(self, data: bytes) -> list[ParseResult]:
        """Consume ``data``; return the values and failures it completed."""
        out = self._out = []
        self._sizes = []
        n = len(data)
        i = 0
        fast = _FAST_TOKEN.match
        emit = self._emit
        while i < n:
            if self._state == _START and not self._partial:
                if self.fast_messages and not self._tokens:
                    end = self._fast_message(data, i)
                    if end:
                        i = end
                        continue
                m = fast(data, i)
                if m is not None:
                    i = m.end()
                    emit(m.group(m.lastindex or 0))
                    continue
            i = self._step(data, i, n)
        return out

    def _fast_message(self, data: bytes, i: int) -> int:
        """Parse one complete plain object at ``data[i:]``; 0 if not possible."""
        if data[i] != _TOKEN_LBRACE and not data[i : i + 1].isspace():
            return 0
        braces = brackets = depth = 0
        end = 0
        limit = min(len(data), i + _FAST_MESSAGE_MAX)
        for m in _PLAIN_STRUCTURE.finditer(data, i, limit):
            c = data[m.start()]
            if c == 0x22:
                continue
            if c == _TOKEN_LBRACE:
                braces += 1
            elif c == _TOKEN_RBRACE:
                braces -= 1
            elif c == _TOKEN_LBRACKET:
                brackets += 1
            else:
                brackets -= 1
            if braces < 0 or brackets < 0:
                return 0
            if braces + brackets > depth:
                depth = braces + brackets
            if braces == 0 and brackets == 0:
                end = m.end()
                break
        if not end or depth > min(self.max_nesting, 64):
            return 0
        # Only now look at the tokens: all of them must be plain.
        if _PLAIN_MESSAGE.fullmatch(data, i, end) is None:
            return 0
        try:
            value = json.loads(data[i:end], object_pairs_hook=_pairs_without_duplicates)
        except ValueError:
            return 0
        self._out.append(value)
        self._sizes.append(end - i)
        return end

    # --- lexer -----------------------------------------------------------

    def _step(self, data: bytes, i: int, n: int) -> int:
        """Advance the DFA from ``data[i]``; return the new index."""
        state = self._state
        part = self._partial
        limit = self.max_token_size
        if state == _START:
            c = data[i]
            if c in _WS:
                # Whitespace is a token to QEMU too, of a kind that is
                # dropped; only its size limit is observable, so count it.
                end = _run_end(_WS_RUN, data, i)
                self._ws_run = 0
                self._count_whitespace(end - i)
                if end >= n:
                    self._state = _WHITESPACE
                return end
            if c in _STRUCTURAL:
                self._emit(bytes((c,)))
                return i + 1
            part.append(c)
            if c == 0x22:
                self._state = _DQ
            elif c == 0x27:
                self._state = _SQ
            elif c == 0x30:
                self._state = _ZERO
            elif 0x31 <= c <= 0x39:
                self._state = _INT
            elif c == 0x2D:
                self._state = _NEG
            elif 0x61 <= c <= 0x7A:
                self._state = _KEYWORD
            else:
                self._lex_error()
            return i + 1
        if state == _RECOVERY:
            end = _run_end(_RECOVERY_RUN, data, i)
            if end < n:
                self._state = _START
            return end
        if state == _WHITESPACE:
            end = _run_end(_WS_RUN, data, i)
            self._count_whitespace(end - i)
            if end < n:
                self._state = _START
            return end
        if state == _DQ or state == _SQ:
            run = _DQ_RUN if state == _DQ else _SQ_RUN
            end = _run_end(run, data, i)
            i = self._extend_run(data, i, end)
            if i < end or i >= n or self._state != state:
                return i
            c = data[i]
            part.append(c)
            if c == 0x5C:
                self._state = _DQ_ESC if state == _DQ else _SQ_ESC
            elif c == (0x22 if state == _DQ else 0x27):
                self._state = _START
                token = bytes(part)
                part.clear()
                self._emit(token)
            else:
                self._lex_error()
                return i + 1
            self._check_partial_size(limit)
            return i + 1
        if state == _DQ_ESC or state == _SQ_ESC:
            c = data[i]
            part.append(c)
            if 0x20 <= c <= 0xFD:
                self._state = _DQ if state == _DQ_ESC else _SQ
                self._check_partial_size(limit)
            else:
                self._lex_error()
            return i + 1
        if state == _KEYWORD:
            end = _run_end(_KEYWORD_RUN, data, i)
            i = self._extend_run(data, i, end)
            if i >= n or self._state != _KEYWORD:
                return i
            self._finish_token()
            return i
        # Numbers.
        c = data[i]
        if state in (_INT, _MANTISSA_DIGITS, _EXP_DIGITS):
            end = _run_end(_DIGIT_RUN, data, i)
            if end > i:
                return self._extend_run(data, i, end)
            if state == _INT and c in b".eE":
                part.append(c)
                self._state = _MANTISSA if c == 0x2E else _EXP_E
            elif state == _MANTISSA_DIGITS and c in b"eE":
                part.append(c)
                self._state = _EXP_E
            else:
                self._finish_token()
                return i
            self._check_partial_size(limit)
            return i + 1
        part.append(c)
        if state == _ZERO:
            if c in _DIGITS:
                self._lex_error()
                return i + 1
            if c == 0x2E:
                self._state = _MANTISSA
                return i + 1
            part.pop()
            self._finish_token()
            return i
        if state == _NEG:
            if c == 0x30:
                self._state = _ZERO
            elif c in _DIGITS:
                self._state = _INT
            else:
                self._lex_error()
            return i + 1
        if state == _MANTISSA or state == _EXP_SIGN:
            if c in _DIGITS:
                self._state = _MANTISSA_DIGITS if state == _MANTISSA else _EXP_DIGITS
            else:
                self._lex_error()
            return i + 1
        if state == _EXP_E:
            if c in _DIGITS:
                self._state = _EXP_DIGITS
            elif c == 0x2B or c == 0x2D:
                self._state = _EXP_SIGN
            else:
                self._lex_error()
            return i + 1
        raise AssertionError(f"bad lexer state {state}")

    def _extend_run(self, data: bytes, i: int, end: int) -> int:
        """Append ``data[i:end]`` to the current token, honouring the size cap.

        QEMU forces a token out once it grows past the limit; what follows
        is then lexed from the start state.
        """
        part = self._partial
        room = self.max_token_size + 1 - len(part)
        if end - i >= room:
            part += data[i : i + room]
            self._force_out_oversized()
            return i + room
        part += data[i:end]
        return end

    def _count_whitespace(self, count: int) -> None:
        self._ws_run += count
        while self._ws_run > self.max_token_size:
            self._ws_run -= self.max_token_size + 1
            self._stream_token(None, self.max_token_size + 1)

    def _check_partial_size(self, limit: int) -> None:
        if len(self._partial) > limit:
            self._force_out_oversized()

    def _force_out_oversized(self) -> None:
        size = len(self._partial)
        self._partial.clear()
        self._state = _START
        self._stream_token(None, size)

    def _finish_token(self) -> None:
        """A number or keyword ended (lookahead byte not consumed)."""
        token = bytes(self._partial)
        self._partial.clear()
        self._state = _START
        self._emit(token)

    def _lex_error(self) -> None:
        text = decode_mod_utf8(bytes(self._partial))
        self._partial.clear()
        self._state = _RECOVERY
        self._fail(f"JSON parse error, stray '{text}'")

    # --- streamer --------------------------------------------------------

    def _emit(self, token: bytes) -> None:
        self._stream_token(token, len(token))

    def _stream_token(self, token: bytes | None, size: int) -> None:
        if token is not None:
            first = token[0]
            if first == _TOKEN_LBRACE:
                self._braces += 1
            elif first == _TOKEN_RBRACE:
                self._braces -= 1
            elif first == _TOKEN_LBRACKET:
                self._brackets += 1
            elif first == _TOKEN_RBRACKET:
                self._brackets -= 1
        if self._token_size + size + 1 > self.max_token_size or token is None:
            self._fail(TOKEN_SIZE_EXCEEDED)
            return
        if len(self._tokens) + 1 > self.max_token_count:
            self._fail("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > self.max_nesting:
            self._fail("JSON nesting depth limit exceeded")
            return
        self._tokens.append(token)
        self._token_size += size
        braces = self._braces
        brackets = self._brackets
        if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
            return
        tokens = self._tokens
        self._sizes.append(self.held_memory)
        self._clear_message()
        self._out.append(parse_tokens(tokens))

    def _fail(self, desc: str) -> None:
        self._clear_message()
        self._out.append(ParseFailure(desc))
        self._sizes.append(0)

    def _clear_message(self) -> None:
        self._tokens = []
        self._token_size = 0
        self._braces = 0
        self._brackets = 0
