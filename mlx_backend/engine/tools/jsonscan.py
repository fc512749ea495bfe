"""An incremental JSON validator, fed one character at a time. Pure Python.

It answers, after every character, whether the text so far is still the start of one valid JSON value
(RFC 8259), and when that value is complete. The tool-call parsers stream a call's arguments only as far as
this scanner has accepted them, so what reaches the client is always a prefix of valid JSON.
"""

from __future__ import annotations

import enum
import re

WHITESPACE = frozenset(" \t\n\r")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = ("true", "false", "null")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')  # string content that changes no state: no quote, escape, control


class Step(enum.Enum):
    MORE = "more"  # accepted; the value goes on
    DONE = "done"  # accepted, and it was the value's last character
    ENDED = "ended"  # not accepted, but the value (a number) was already complete before it
    ERROR = "error"  # not accepted: no valid JSON starts with the text so far plus this character


class _S(enum.Enum):
    VALUE = 0  # a value may start here (whitespace skipped)
    KEY_OR_CLOSE = 1  # just after "{": a key or "}"
    VALUE_OR_CLOSE = 2  # just after "[": a value or "]"
    KEY = 3  # after "," in an object: a key
    COLON = 4
    AFTER_VALUE = 5  # inside a container, after a member: "," or the closer
    STRING = 6
    ESCAPE = 7
    UNICODE = 8
    NUMBER = 9
    LITERAL = 10
    FINISHED = 11


class JsonScanner:
    """Validates one JSON value as it arrives. `feed` one character at a time; the scanner never backs up.

    `top_level` limits what the value may be: the call parsers only ever want an object (arguments, a call)
    or an array (a list of calls), never a bare number.
    """

    def __init__(self, top_level: str = "{[\"") -> None:
        self._top_level = top_level
        self._state = _S.VALUE
        self._stack: list[str] = []  # open containers, "{" or "["
        self._in_key = False  # the string being read is an object key
        self._unicode_left = 0
        self._number = ""  # the number read so far (validated on every character)
        self._literal = ""
        self.finished = False
        self.failed = False

    @property
    def depth(self) -> int:
        return len(self._stack)

    @property
    def in_string(self) -> bool:
        return self._state in (_S.STRING, _S.ESCAPE, _S.UNICODE)

    def plain_run(self, text: str, start: int) -> int:
        """How many characters of `text` from `start` are plain content of the string being read (no quote,
        backslash or control character): feeding them one by one would only accept them."""
        if self._state is not _S.STRING or self.failed:
            return 0
        match = _PLAIN.match(text, start)
        return match.end() - start if match else 0

    def feed(self, ch: str) -> Step:
        """One character; after an ERROR every later character is an ERROR too."""
        if self.failed:
            return Step.ERROR
        step = self._feed(ch)
        if step is Step.ERROR:
            self.failed = True
        return step

    def _feed(self, ch: str) -> Step:
        state = self._state
        if state is _S.FINISHED:
            return Step.ENDED
        if state in (_S.STRING, _S.ESCAPE, _S.UNICODE):
            return self._string(ch)
        if state is _S.NUMBER:
            if _number_prefix(self._number + ch):
                self._number += ch
                return Step.MORE
            if not _number_complete(self._number):
                return Step.ERROR
            self._state = _S.AFTER_VALUE
            if not self._stack:
                return self._finish(ended=True)
            return self._feed(ch)  # the character after a number is the container's
        if state is _S.LITERAL:
            self._literal += ch
            if not any(word.startswith(self._literal) for word in _LITERALS):
                return Step.ERROR
            if self._literal in _LITERALS:
                return self._value_done()
            return Step.MORE
        if ch in WHITESPACE:
            return Step.MORE
        if state in (_S.VALUE, _S.VALUE_OR_CLOSE):
            if state is _S.VALUE_OR_CLOSE and ch == "]":
                return self._close()
            return self._start_value(ch)
        if state in (_S.KEY_OR_CLOSE, _S.KEY):
            if state is _S.KEY_OR_CLOSE and ch == "}":
                return self._close()
            if ch != '"':
                return Step.ERROR
            self._state, self._in_key = _S.STRING, True
            return Step.MORE
        if state is _S.COLON:
            if ch != ":":
                return Step.ERROR
            self._state = _S.VALUE
            return Step.MORE
        # AFTER_VALUE: inside a container
        top = self._stack[-1]
        if ch == ",":
            self._state = _S.KEY if top == "{" else _S.VALUE
            return Step.MORE
        if ch == ("}" if top == "{" else "]"):
            return self._close()
        return Step.ERROR

    def _start_value(self, ch: str) -> Step:
        if not self._stack and ch not in self._top_level:
            return Step.ERROR
        if ch == "{":
            self._stack.append("{")
            self._state = _S.KEY_OR_CLOSE
        elif ch == "[":
            self._stack.append("[")
            self._state = _S.VALUE_OR_CLOSE
        elif ch == '"':
            self._state, self._in_key = _S.STRING, False
        elif ch == "-" or ch in _DIGITS:
            self._state, self._number = _S.NUMBER, ch
        elif ch in "tfn":
            self._state, self._literal = _S.LITERAL, ch
        else:
            return Step.ERROR
        return Step.MORE

    def _string(self, ch: str) -> Step:
        if self._state is _S.ESCAPE:
            if ch == "u":
                self._state, self._unicode_left = _S.UNICODE, 4
            elif ch in _ESCAPES:
                self._state = _S.STRING
            else:
                return Step.ERROR
            return Step.MORE
        if self._state is _S.UNICODE:
            if ch not in _HEX:
                return Step.ERROR
            self._unicode_left -= 1
            if not self._unicode_left:
                self._state = _S.STRING
            return Step.MORE
        if ch == "\\":
            self._state = _S.ESCAPE
            return Step.MORE
        if ch == '"':
            if self._in_key:
                self._state, self._in_key = _S.COLON, False
                return Step.MORE
            return self._value_done()
        if ord(ch) < 0x20:  # control characters must be escaped inside strings
            return Step.ERROR
        return Step.MORE

    def _value_done(self) -> Step:
        self._state = _S.AFTER_VALUE
        return Step.MORE if self._stack else self._finish()

    def _close(self) -> Step:
        self._stack.pop()
        return self._value_done()

    def _finish(self, ended: bool = False) -> Step:
        self._state = _S.FINISHED
        self.finished = True
        return Step.ENDED if ended else Step.DONE


def _number_prefix(text: str) -> bool:
    """Whether text can still grow into a JSON number: -?(0|[1-9]\\d*)(\\.\\d+)?([eE][+-]?\\d+)?"""
    i, n = 0, len(text)
    if i < n and text[i] == "-":
        i += 1
    if i == n:
        return True
    if text[i] == "0":
        i += 1
    elif text[i] in _DIGITS:
        while i < n and text[i] in _DIGITS:
            i += 1
    else:
        return False
    if i < n and text[i] == ".":
        i += 1
        if i == n:
            return True
        if text[i] not in _DIGITS:
            return False
        while i < n and text[i] in _DIGITS:
            i += 1
    if i < n and text[i] in "eE":
        i += 1
        if i < n and text[i] in "+-":
            i += 1
        if i == n:
            return True
        if text[i] not in _DIGITS:
            return False
        while i < n and text[i] in _DIGITS:
            i += 1
    return i == n


def _number_complete(text: str) -> bool:
    return bool(text) and text[-1] in _DIGITS
