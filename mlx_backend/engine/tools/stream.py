"""The incremental tool-call parser: decoded text in, content and tool-call pieces out. Pure Python.

Feed it the text of each decoded segment; it returns the content that is safe to show now and the
tool-call pieces (OpenAI's delta.tool_calls) that the text completed. Text that could still turn out to be
call markup is held back, so markup never reaches the content, however the text is split.

What comes out, and when:
- A call's first piece (index, id, name, and the first characters of its arguments) is sent once its name
  is known to be one of the request's tools and its arguments have begun; the arguments then stream as far
  as an incremental JSON validator has accepted them. A call with no arguments member gets "{}".
- Whitespace between content and markup, and between calls, is not content.
- `done` turns true when nothing more can matter: the first call is complete and parallel calls are off
  (or the family's template renders only one call per turn), the request's `max_calls` are made, or a call
  repeats an earlier one (`drop_repeats`). The batcher should end the request there.
- With `drop_repeats` (tool_choice "required"), a call is held back while it is the same, so far, as an
  earlier whole call of the reply (same name, same arguments); it is sent as soon as it differs. If it ends
  the same, it is dropped and the reply ends: small models repeat a forced call until the call limit.

Malformed output (a model may write anything when tool_choice is "auto"):
- Markup whose call cannot be read before anything was sent (not JSON, no name, a name that is not one of
  the tools, arguments that are not an object) is dropped: neither content nor a call. For Llama's bare
  JSON, which has no marker, such text is the model's content instead (a JSON answer is not a call).
- A JSON object in the markup that is not such a call is skipped and reading goes on (a Mistral list may
  hold a bad call and a good one); text that stops being JSON drops the rest of that markup block.
- A call whose arguments go wrong after they began streaming keeps what was sent (a prefix of valid JSON,
  as when the generation runs out of tokens mid-call); the rest of its markup is dropped. It counts as a
  call: the client has already seen it.

The formats read by mlx-lm's own parsers (family body "delimited") are buffered up to their end marker and
each call is sent whole then, in one piece.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import re
import secrets
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from mlx_backend.contract import ToolCallDelta, join_pieces
from mlx_backend.engine.tools.families import Family
from mlx_backend.engine.tools.jsonscan import WHITESPACE, JsonScanner, Step

log = logging.getLogger(__name__)

_ID_ALPHABET = string.ascii_letters + string.digits
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")


def new_call_id() -> str:
    """OpenAI's shape: "call_" and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class StreamOutput:
    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    done: bool = False  # no later text can matter: end the request (finish_reason "tool_calls")


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str
    parts: list[str]  # the argument text as it was sent
    complete: bool = False  # False: cut short (out of tokens, or the arguments went wrong after they began)

    @property
    def arguments(self) -> str:
        """The JSON text of the arguments (all of it once complete)."""
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


class ToolCallParser:
    """One reply's parser. `tool_names`: the functions the model may call; `tools`: the OpenAI tool list,
    passed on to mlx-lm's parsers (some read argument types from it). `suppress`: parse calls but send
    none (tool_choice "none": markup is dropped, no call comes out)."""

    def __init__(
        self,
        family: Family,
        tool_names: Collection[str],
        *,
        tools: list[dict[str, Any]] | None = None,
        parallel: bool = True,
        suppress: bool = False,
        new_id: Callable[[], str] = new_call_id,
        max_calls: int | None = None,
        drop_repeats: bool = False,
    ) -> None:
        self.family = family
        self._names = frozenset(tool_names)
        self._tools = tools
        self._max_calls = 1 if not parallel else family.max_calls
        if max_calls is not None:  # the request's bound: done once it is reached
            self._max_calls = min(max_calls, self._max_calls or max_calls)
        self._suppress = suppress
        self._new_id = new_id
        self._mistral = family.start == "[TOOL_CALLS]"  # reads both Mistral layouts, whichever comes
        self.calls: list[ParsedCall] = []  # every call sent, in order
        self._drop_repeats = drop_repeats
        self._held: ParsedCall | None = None  # a call that so far repeats an earlier one: not sent yet
        self.dropped = 0  # markup read as a call that could not be sent
        self.done = False
        self._out = _Out()
        self._buf = ""  # text received and not yet decided
        self._mode = _Mode.TEXT
        self._ws = ""  # the content's trailing whitespace: sent when text follows, dropped before markup
        self._after_markup = False  # whitespace right after markup is dropped too
        self._text_seen = False  # content has been sent (Llama's bare JSON can only open the reply)
        # The markup being read.
        self._call: _CallReader | None = None
        self._body_calls = 0  # calls completed in this markup block
        self._body_items = 0  # JSON objects read in it, calls or not
        self._in_list = False  # inside the JSON array of a Mistral v3 block
        self._bare = False  # reading Llama's bare JSON: until its call is sent, its text may be content
        self._raw = ""  # that text
        self._block = ""  # a delimited body so far

    # -- the interface ---------------------------------------------------------------------------------------

    def feed(self, text: str) -> StreamOutput:
        if not self.done:
            self._buf += text
            self._run(final=False)
        return self._out.take(self.done)

    def finish(self) -> StreamOutput:
        """The generation ended: decide everything still held."""
        if not self.done:
            self._run(final=True)
            self._end_of_text()
        return self._out.take(self.done)

    # -- driving ---------------------------------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        handlers: dict[_Mode, Callable[[bool], bool]] = {
            _Mode.TEXT: self._text,
            _Mode.JSON: self._json_body,
            _Mode.ARGS: self._args_body,
            _Mode.DELIMITED: self._delimited,
            _Mode.SKIP: self._skip,
        }
        # A handler returns True when the next one (its mode may have changed) should go on with the rest.
        while self._buf and not self.done and handlers[self._mode](final):
            pass

    def _end_of_text(self) -> None:
        if self._call is not None:
            self._call_failed(self._call)
        elif self._mode is _Mode.JSON and self._bare:
            self._fallback_to_content()
        elif self._mode in (_Mode.JSON, _Mode.ARGS) and not self._body_items:
            self.dropped += 1  # a marker and nothing after it
        elif self._mode is _Mode.DELIMITED:
            body, self._block = self._block + self._buf, ""
            self._buf = ""
            self._parse_delimited(body)
        if self._mode is _Mode.TEXT:
            self._emit_text(self._buf)
            if not self._after_markup:
                self._out.content.append(self._ws)
        self._buf = self._ws = ""

    # -- content ---------------------------------------------------------------------------------------------

    def _text(self, final: bool) -> bool:
        buf, start = self._buf, self.family.start
        if self.family.bare_json and not self._text_seen and not self._suppress and not self.calls:
            stripped = buf.lstrip()
            if not stripped and not final:
                return False  # only whitespace so far: a call may still follow
            if stripped.startswith("{"):
                self._raw = self._ws + buf[: len(buf) - len(stripped)]  # content again if this is no call
                self._ws, self._buf = "", stripped
                self._open_body()
                self._bare = True
                return True
        at = buf.find(start) if start else -1
        if at >= 0:
            self._emit_text(buf[:at])
            self._ws = ""  # whitespace before markup is not content
            self._buf = buf[at + len(start):]
            self._open_body()
            return True
        keep = _partial_suffix(buf, start) if start and not final else 0
        self._emit_text(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _emit_text(self, text: str) -> None:
        if self._after_markup:
            text = text.lstrip()
            if not text:
                return
            self._after_markup = False
        full = self._ws + text
        core = full.rstrip()
        self._ws = full[len(core):]
        if core:
            self._out.content.append(core)
            self._text_seen = True

    def _open_body(self) -> None:
        self._call = None
        self._body_calls = self._body_items = 0
        self._in_list = False
        self._block = ""
        self._mode = {"json": _Mode.JSON, "args": _Mode.ARGS, "delimited": _Mode.DELIMITED}[self.family.body]

    def _close_markup(self) -> None:
        self._mode = _Mode.TEXT
        self._call = None
        self._bare = False
        self._raw = ""
        self._after_markup = True
        self._ws = ""

    def _fallback_to_content(self) -> None:
        raw = self._raw
        self._close_markup()
        self._after_markup = False
        self._text_seen = True
        self._emit_text(raw)

    # -- JSON call objects: Hermes, Llama, Mistral v3 --------------------------------------------------------

    def _json_body(self, final: bool) -> bool:
        buf, start, end, i = self._buf, self.family.start, self.family.end, 0
        while i < len(buf) and not self.done:
            ch = buf[i]
            call = self._call
            if self._bare and not self.calls and start:
                # Llama's marker cannot be inside its bare JSON: the JSON was content, the marker opens a call.
                if buf.startswith(start, i):
                    self._consume(i)
                    self._fallback_to_content()
                    return True
                if len(buf) - i < len(start) and start.startswith(buf[i:]) and not final:
                    break
            if call is not None:
                run = 0 if self._bare and not self.calls and start else call.plain_run(buf, i)
                if run:  # the middle of a string (a long argument): taken at once, not a character at a time
                    call.feed_plain(buf[i:i + run])
                    i += run
                    continue
                status = call.feed(ch)
                if status is _Status.FAIL:  # this character is not the call's: decided below
                    self._consume(i)
                    self._call_failed(call)
                    return True
                i += 1
                if status is _Status.COMPLETE:
                    self._consume(i)
                    self._call_complete(call)
                    return True
                continue
            if end and buf.startswith(end, i):
                self._consume(i + len(end))
                self._close_markup()
                return True
            if end and len(buf) - i < len(end) and end.startswith(buf[i:]) and not final:
                break  # maybe the end marker: wait for more
            if ch in WHITESPACE or (ch in ",;" and self._body_items):
                i += 1
            elif ch == "[" and not self._in_list and not self._body_items:
                self._in_list = True
                i += 1
            elif ch == "]" and self._in_list:
                self._in_list = False
                i += 1
                if not end:
                    self._consume(i)
                    self._close_markup()
                    return True
            elif ch == "{":
                self._call = _CallReader(self, self.family.argument_keys)
            elif self._mistral and ch in _NAME_CHARS and not self._body_calls and not self._in_list:
                self._consume(i)  # Mistral's other layout: name[ARGS]{...}
                self._mode = _Mode.ARGS
                return True
            else:
                self._consume(i)
                if self._body_calls:
                    self._junk()  # text after the calls
                else:
                    self._not_a_call(skip_rest=True)
                return True
        self._consume(i)
        return False

    def _consume(self, upto: int) -> None:
        if self._bare:
            self._raw += self._buf[:upto]
        self._buf = self._buf[upto:]

    def _call_complete(self, call: _CallReader) -> None:
        self._call = None
        self._body_items += 1
        if not call.sent and (call.ignored or not self._start_call(call)):
            self._not_a_call(skip_rest=False)
            return
        self._body_calls += 1
        self._finish_call(call, complete=True)

    def _call_failed(self, call: _CallReader) -> None:
        self._call = None
        if call.sent and call.args_complete:
            # Its arguments are whole (e.g. the closing brace forgotten before </tool_call>): the call is.
            self._body_calls += 1
            self._finish_call(call, complete=True)
        elif call.sent:
            log.info("tool call %s cut short: its arguments stopped being valid JSON", call.name)
            self._finish_call(call, complete=False)
            self._junk()
        else:
            self._not_a_call(skip_rest=True)

    def _not_a_call(self, skip_rest: bool) -> None:
        """Markup that is no call of the request's tools: dropped (Llama's bare JSON: content). With
        skip_rest, the rest of the markup goes too (it stopped being JSON); without, reading goes on."""
        if self._bare and not self.calls:
            self._fallback_to_content()
            return
        self.dropped += 1
        log.info("dropped tool-call markup that is not a call of one of the request's tools")
        if skip_rest:
            self._junk()

    def _junk(self) -> None:
        """What follows is not calls. A marker without an end ends at the last call (text after it is
        content); otherwise the rest of the markup is dropped, up to its end marker or the next call."""
        if self._bare and not self.calls:
            self._fallback_to_content()
        elif not self.family.end and self._body_calls and not self._in_list:
            self._close_markup()
        else:
            self._mode = _Mode.SKIP

    def _skip(self, final: bool) -> bool:
        marker = self.family.end or self.family.start
        at = self._buf.find(marker) if marker else -1
        if at < 0:
            keep = _partial_suffix(self._buf, marker) if marker and not final else 0
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        # Past an end marker, or up to the next call's marker (read as a new call).
        self._buf = self._buf[at + len(marker):] if self.family.end else self._buf[at:]
        self._close_markup()
        return True

    # -- Mistral's name[ARGS]{...} ---------------------------------------------------------------------------

    def _args_body(self, final: bool) -> bool:
        call = self._call
        if call is not None:  # the arguments object
            buf, i = self._buf, 0
            while i < len(buf):
                status = call.feed_arguments(buf[i])
                if status is _Status.FAIL:
                    self._buf = buf[i:]
                    self._call_failed(call)
                    return True
                i += 1
                if status is _Status.COMPLETE:
                    self._buf = buf[i:]
                    self._call_complete(call)
                    if self._mode is _Mode.ARGS:
                        self._close_markup()
                    return True
            self._buf = ""
            return False
        match = _ARGS_HEADER.match(self._buf)
        if match is None:
            if _args_header_prefix(self._buf) and not final:
                return False
            stripped = self._buf.lstrip()
            if stripped[:1] in ("[", "{"):  # the other layout after all: [TOOL_CALLS][{...}]
                self._buf = stripped
                self._mode = _Mode.JSON
                return True
            self._not_a_call(skip_rest=True)
            return True
        self._buf = self._buf[match.end():]
        call = _CallReader(self, ())
        if not self._name_ok(match.group(1)):
            self._not_a_call(skip_rest=True)
            return True
        call.name = match.group(1)
        call.expect_arguments()
        self._call = call
        return True

    # -- bodies read by mlx-lm's parsers ---------------------------------------------------------------------

    def _delimited(self, final: bool) -> bool:
        buf = self._block + self._buf
        end = self.family.end
        # The end marker cannot lie wholly inside the part already searched.
        at = buf.find(end, max(0, len(self._block) - len(end) + 1)) if end else -1
        if at < 0:
            self._block, self._buf = buf, ""
            return False
        self._block, self._buf = "", buf[at + len(end):]
        self._parse_delimited(buf[:at])
        self._close_markup()
        return True

    def _parse_delimited(self, body: str) -> None:
        assert self.family.mlx_parser is not None
        module = importlib.import_module(f"mlx_lm.tool_parsers.{self.family.mlx_parser}")
        try:
            parsed = module.parse_tool_call(body, self._tools)
        except Exception as exc:  # each parser raises its own errors (ValueError, JSONDecodeError, ...)
            log.info("dropped tool-call markup mlx-lm's %s parser rejects: %s", self.family.mlx_parser, exc)
            self.dropped += 1
            return
        for item in parsed if isinstance(parsed, list) else [parsed]:
            name = item.get("name") if isinstance(item, dict) else None
            arguments = item.get("arguments", {}) if isinstance(item, dict) else None
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    arguments = None
            if not isinstance(name, str) or not isinstance(arguments, dict) or not self._name_ok(name):
                self.dropped += 1
                continue
            if not self.done:
                parsed_call = self._send_call(name, json.dumps(arguments, ensure_ascii=False))
                self._finish(parsed_call, complete=True)

    # -- sending ---------------------------------------------------------------------------------------------

    def _name_ok(self, name: str) -> bool:
        return self._suppress or name in self._names

    def _start_call(self, call: _CallReader) -> bool:
        """The call's name is one of the tools and its arguments have begun (or are known): send it."""
        if call.name is None or not self._name_ok(call.name):
            return False
        arguments = call.pending_arguments if call.pending_arguments is not None else ("" if call.streaming else "{}")
        call.parsed = self._send_call(call.name, arguments)
        call.sent = True
        self._bare = False  # confirmed: this is markup, none of it content
        self._raw = ""
        return True

    def _send_call(self, name: str, arguments: str) -> ParsedCall:
        parsed = ParsedCall(len(self.calls), "", name, [arguments])
        if not self._suppress:
            parsed.id = self._new_id()
            if self._drop_repeats and self._repeats(parsed):
                self._held = parsed  # sent once it differs from the call it repeats so far (see _finish)
                return parsed
            self.calls.append(parsed)
            self._out.add(ToolCallDelta(parsed.index, parsed.id, name, arguments))
        return parsed

    def _send_arguments(self, call: _CallReader, text: str) -> None:
        parsed = call.parsed
        assert parsed is not None
        parsed.parts.append(text)
        if parsed is self._held:
            if not self._repeats(parsed):
                self._release(parsed)
        elif not self._suppress:
            self._out.add_arguments(parsed.index, text)

    def _repeats(self, parsed: ParsedCall) -> bool:
        """Whether the call so far is the start of an earlier whole call: the same name, the same arguments."""
        text = parsed.arguments
        return any(c.complete and c.name == parsed.name and c.arguments.startswith(text) for c in self.calls)

    def _release(self, parsed: ParsedCall) -> None:
        self._held = None
        self.calls.append(parsed)
        self._out.add(ToolCallDelta(parsed.index, parsed.id, parsed.name, parsed.arguments))

    def _finish_call(self, call: _CallReader, complete: bool) -> None:
        if call.parsed is not None:
            self._finish(call.parsed, complete)

    def _finish(self, parsed: ParsedCall, complete: bool) -> None:
        parsed.complete = complete
        if parsed is self._held:
            # The same call again, whole (or cut while still the same): a model repeating itself. Not sent;
            # the reply ends here (a forced call would otherwise repeat until max_tokens).
            self._held = None
            self.done = True
            return
        if not self._suppress and self._max_calls is not None and len(self.calls) >= self._max_calls:
            self.done = True


# A Mistral v11+ call header: name, optionally [CALL_ID] and an id, then [ARGS].
_ARGS_HEADER = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]")


def _args_header_prefix(text: str) -> bool:
    """Whether text can still grow into a call header."""
    rest = re.sub(r"^\s*[A-Za-z0-9_.\-]*", "", text, count=1)
    if "[ARGS]".startswith(rest) or "[CALL_ID]".startswith(rest):
        return True
    if rest.startswith("[CALL_ID]"):
        return "[ARGS]".startswith(re.sub(r"^[A-Za-z0-9]*", "", rest[len("[CALL_ID]"):], count=1))
    return False


class _Mode(enum.Enum):
    TEXT = "text"
    JSON = "json"  # between or inside JSON call objects
    ARGS = "args"  # a Mistral name[ARGS]{...} call
    DELIMITED = "delimited"  # a body for one of mlx-lm's parsers
    SKIP = "skip"  # the rest of markup that is not calls


class _Status(enum.Enum):
    MORE = "more"
    COMPLETE = "complete"
    FAIL = "fail"  # the character is not part of the call: the call reader stays where it was


class _At(enum.Enum):
    """Where a call reader is inside its object."""

    OPEN = 0  # before "{"
    FIRST = 1  # after "{": a key or "}"
    KEY_NEXT = 2  # after ",": a key
    KEY = 3
    COLON = 4
    VALUE = 5
    AFTER = 6  # after a member: "," or "}"


class _CallReader:
    """Reads one JSON call object ({"name": ..., "arguments": {...}, ...}) a character at a time, and has
    the parser send the call's first piece and its argument text as soon as they are certain."""

    def __init__(self, parser: ToolCallParser, argument_keys: tuple[str, ...]) -> None:
        self._parser = parser
        self._argument_keys = argument_keys
        self._at = _At.OPEN
        self._whole = JsonScanner(top_level="{")
        self._scanner = JsonScanner()
        self._text = ""  # the key or value being read
        self._key = ""
        self._role = "other"  # what the value is: "name", "args", "args-string", "other"
        self._seen_args = False
        self.name: str | None = None
        self.pending_arguments: str | None = None  # arguments read before the name
        self.streaming = False
        self.args_complete = False
        self.sent = False
        self.ignored = False  # JSON, but not a call of one of the tools (or not a call at all)
        self.parsed: ParsedCall | None = None

    def feed(self, ch: str) -> _Status:
        """FAIL only when the text stops being JSON; an object that is JSON but not a call is read to its
        end and comes back COMPLETE with `ignored` set, so the markup after it is still read."""
        step = self._whole.feed(ch)
        if step is Step.ERROR:
            return _Status.FAIL
        if not self.ignored and self._member(ch) is _Status.FAIL:
            self.ignored = True
        return _Status.COMPLETE if step is Step.DONE else _Status.MORE

    def plain_run(self, text: str, start: int) -> int:
        """How many characters of `text` from `start` only continue the string being read (`feed_plain`)."""
        run = self._whole.plain_run(text, start)
        if run and not self.ignored:
            started = self._at is _At.KEY or (self._at is _At.VALUE and bool(self._text))
            run = min(run, self._scanner.plain_run(text, start)) if started else 0
        return run

    def feed_plain(self, run: str) -> None:
        """`run` (from `plain_run`), as `feed` would take it a character at a time."""
        if self.ignored:
            return
        self._text += run
        if self._at is _At.VALUE and self._role == "args" and not self._arguments_char(run):
            self.ignored = True

    def _member(self, ch: str) -> _Status:
        at = self._at
        if at is _At.VALUE:
            return self._value(ch)
        if at is _At.KEY:
            return self._key_char(ch)
        if ch in WHITESPACE:
            return _Status.MORE
        if at is _At.OPEN:
            if ch != "{":
                return _Status.FAIL
            self._at = _At.FIRST
            return _Status.MORE
        if at in (_At.FIRST, _At.AFTER) and ch == "}":
            return _Status.COMPLETE
        if at in (_At.FIRST, _At.KEY_NEXT):
            if ch != '"':
                return _Status.FAIL
            self._at, self._scanner, self._text = _At.KEY, JsonScanner(top_level='"'), ""
            return self._key_char(ch)
        if at is _At.COLON:
            if ch != ":":
                return _Status.FAIL
            self._expect_value()
            return _Status.MORE
        if ch == ",":  # AFTER
            self._at = _At.KEY_NEXT
            return _Status.MORE
        return _Status.FAIL

    def expect_arguments(self) -> None:
        """For name[ARGS]{...}: the arguments object is all there is to read."""
        self._role, self._seen_args = "args", True
        self._at, self._scanner, self._text = _At.VALUE, JsonScanner(top_level="{"), ""

    def feed_arguments(self, ch: str) -> _Status:
        status = self._value(ch)
        return _Status.COMPLETE if status is _Status.MORE and self._at is _At.AFTER else status

    def _key_char(self, ch: str) -> _Status:
        step = self._scanner.feed(ch)
        if step is Step.ERROR:
            return _Status.FAIL
        self._text += ch
        if step is Step.DONE:
            self._key = json.loads(self._text)
            self._at = _At.COLON
        return _Status.MORE

    def _expect_value(self) -> None:
        if self._key == "name":
            self._role = "name"
        elif self._key in self._argument_keys and not self._seen_args:
            self._role, self._seen_args = "args", True
        else:
            self._role = "other"
        self._at, self._scanner, self._text = _At.VALUE, JsonScanner(top_level='{["tfn-0123456789'), ""

    def _value(self, ch: str) -> _Status:
        started = bool(self._text)
        if not started and ch in WHITESPACE:
            return _Status.MORE
        if not started and ((self._role == "name" and ch != '"') or (self._role == "args" and ch not in '{"')):
            return _Status.FAIL  # a name is a string; arguments are an object (or its JSON text)
        step = self._scanner.feed(ch)
        if step is Step.ERROR:
            return _Status.FAIL
        if step is Step.ENDED:  # a number ended just before this character, which is the object's
            status = self._value_done()
            return status if status is _Status.FAIL else self._member(ch)
        if not started and self._role == "args" and ch == '"':
            self._role = "args-string"
        self._text += ch
        if self._role == "args" and not self._arguments_char(ch):
            return _Status.FAIL
        return self._value_done() if step is Step.DONE else _Status.MORE

    def _arguments_char(self, ch: str) -> bool:
        if self.sent:
            self._parser._send_arguments(self, ch)
        elif self.name is not None:  # the call starts with the first character of its arguments
            self.streaming = True
            if not self._parser._start_call(self):
                return False
            self._parser._send_arguments(self, ch)
        else:  # the name comes later: keep the arguments until it does
            self.pending_arguments = (self.pending_arguments or "") + ch
        return True

    def _value_done(self) -> _Status:
        self._at = _At.AFTER
        if self._role == "name":
            value = json.loads(self._text)
            if not isinstance(value, str) or not self._parser._name_ok(value):
                return _Status.FAIL
            self.name = value
            if self.args_complete and not self._parser._start_call(self):
                return _Status.FAIL
        elif self._role == "args":
            self.args_complete = True
        elif self._role == "args-string":  # arguments sent as a JSON string holding the object
            inner = json.loads(self._text)
            try:
                decoded = json.loads(inner)
            except json.JSONDecodeError:
                decoded = None
            if not isinstance(decoded, dict):
                return _Status.FAIL
            self.pending_arguments, self.args_complete = inner, True
            if self.name is not None and not self._parser._start_call(self):
                return _Status.FAIL
        return _Status.MORE


class _Out:
    """What one feed sends: content pieces, and tool-call pieces (joined as every Delta's are)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self._calls: list[ToolCallDelta] = []

    def add(self, delta: ToolCallDelta) -> None:
        self._calls.append(delta)

    def add_arguments(self, index: int, text: str) -> None:
        self._calls.append(ToolCallDelta(index, arguments=text))

    def take(self, done: bool) -> StreamOutput:
        output = StreamOutput("".join(self.content), join_pieces(self._calls), done)
        self.content, self._calls = [], []
        return output


def _partial_suffix(buffer: str, marker: str) -> int:
    """Length of the longest suffix of buffer that is a proper prefix of marker."""
    for size in range(min(len(marker) - 1, len(buffer)), 0, -1):
        if marker.startswith(buffer[-size:]):
            return size
    return 0
