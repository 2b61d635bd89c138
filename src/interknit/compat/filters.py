"""Consul's ``?filter=`` expressions (go-bexpr), the common subset, over the rows we answer.

Covered, with Consul's precedence (``not`` binds tightest, then ``and``, then ``or``) and
parentheses::

    Selector == "value"        Selector != "value"
    Selector is empty          Selector is not empty
    "value" in Selector        "value" not in Selector
    Selector contains "value"  Selector not contains "value"
    Selector matches "regex"   Selector not matches "regex"

A selector is a dotted path into the row the endpoint answers (``Service.Meta.version``,
``ServiceTags``, ``Node.Datacenter``); each endpoint lists its selectors in a schema, and one
it does not know is refused with 400 naming it, as is everything outside this subset
(selectors inside lists of objects such as ``Checks.Status``, comparing two selectors, an
operator applied to a kind it does not fit). Values are quoted with ``"`` or backticks, or
bare words. ``in`` and ``contains`` test a list's elements, a map's keys or a string's
substrings. ``matches`` is Python's ``re.search``, refused for patterns that could take
exponential time (back-references, look-arounds, nested quantifiers), since Go's RE2 cannot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Union

from interknit.registry.state import RegistryError

MAX_FILTER = 2048
MAX_DEPTH = 32
MAX_PATTERN = 256

# Leaf kinds of a schema; a nested dict is an object with fields of its own.
STR, INT, BOOL, LIST, MAP, OBJECTS = "str", "int", "bool", "list", "map", "objects"
Schema = dict[str, Union[str, "Schema"]]
Row = dict[str, Any]
Predicate = Callable[[Row], bool]

_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "empty", "contains", "matches"})
_TOKEN = re.compile(
    r"\s*(?:(?P<paren>[()])|(?P<op>==|!=)|(?P<dq>\"(?:[^\"\\]|\\.)*\")|(?P<bq>`[^`]*`)"
    r"|(?P<word>[^\s()\"`=!]+))"
)
# Patterns Go's RE2 refuses or runs in linear time but Python's backtracking engine may not.
_SLOW_PATTERN = re.compile(r"\\[1-9]|\(\?[=!<]|\((?:[^()\\]|\\.)*[*+}](?:[^()\\]|\\.)*\)\s*[*+{]")


class FilterError(RegistryError):
    pass


def _fail(message: str) -> NoReturn:
    raise FilterError(f"filter: {message}", [{"field": "filter", "message": message}])


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "(" ")" "==" "!=" "str" "word"
    value: str


def tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        match = _TOKEN.match(text, pos)
        if match is None:
            _fail(f"cannot read {text[pos : pos + 20].strip()!r}")
        pos = match.end()
        if match.group("paren"):
            tokens.append(_Token(match.group("paren"), match.group("paren")))
        elif match.group("op"):
            tokens.append(_Token(match.group("op"), match.group("op")))
        elif match.group("dq"):
            try:
                value = json.loads(match.group("dq"))
            except ValueError:
                _fail(f"bad escape in {match.group('dq')[:40]}")
            tokens.append(_Token("str", value))
        elif match.group("bq"):
            tokens.append(_Token("str", match.group("bq")[1:-1]))
        else:
            tokens.append(_Token("word", match.group("word")))
    return tokens


def _resolve(path: str, schema: Schema) -> tuple[tuple[str, ...], str]:
    """The keys of a selector in a row, and the kind of value it selects."""
    parts = path.split(".")
    node: Schema = schema
    keys: list[str] = []
    for i, part in enumerate(parts):
        kind = node.get(part)
        if kind is None:
            _fail(f"unknown selector {path!r}")
        keys.append(part)
        rest = parts[i + 1 :]
        if isinstance(kind, dict):
            if not rest:
                _fail(f"selector {path!r} is an object; name one of its fields")
            node = kind
            continue
        if kind == MAP and rest:
            if len(rest) != 1 or not rest[0]:
                _fail(f"unknown selector {path!r}")
            return (*keys, rest[0]), STR
        if kind == OBJECTS and rest:
            _fail(
                f"selector {path!r} looks inside a list of objects, which this filter subset "
                "does not cover (use 'is empty' or 'is not empty' on the list itself)"
            )
        if rest:
            _fail(f"unknown selector {path!r}")
        return tuple(keys), kind
    _fail(f"unknown selector {path!r}")  # an empty path; the tokenizer never makes one


_ZERO: dict[str, Any] = {STR: "", INT: 0, BOOL: False, LIST: [], MAP: {}, OBJECTS: []}


def _getter(keys: tuple[str, ...], kind: str) -> Callable[[Row], Any]:
    """Reads a selector from a row; a field the row leaves out reads as its zero value, as
    Go's structs (which Consul filters) always have every field."""
    zero = _ZERO[kind]

    def get(row: Row) -> Any:
        value: Any = row
        for key in keys:
            if not isinstance(value, dict):
                return zero
            value = value.get(key)
        return zero if value is None else value

    return get


def _pattern(value: str) -> re.Pattern[str]:
    if len(value) > MAX_PATTERN:
        _fail(f"a pattern is longer than {MAX_PATTERN} characters")
    if _SLOW_PATTERN.search(value):
        _fail(
            f"pattern {value[:40]!r} uses back-references, look-arounds or nested "
            "quantifiers, which are not supported"
        )
    try:
        return re.compile(value)
    except re.error as exc:
        _fail(f"pattern {value[:40]!r} is not a regular expression ({exc})")


def _typed(value: str, kind: str, selector: str) -> object:
    if kind == INT:
        if not re.fullmatch(r"-?[0-9]{1,18}", value):
            _fail(f"{value[:40]!r} is not a number, and {selector} is one")
        return int(value)
    if kind == BOOL:
        if value not in ("true", "false"):
            _fail(f"{selector} is true or false, not {value[:40]!r}")
        return value == "true"
    return value


class _Parser:
    def __init__(self, tokens: list[_Token], schema: Schema) -> None:
        self.tokens = tokens
        self.pos = 0
        self.schema = schema
        self.depth = 0

    def peek(self, offset: int = 0) -> _Token | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def keyword(self, word: str, offset: int = 0) -> bool:
        token = self.peek(offset)
        return token is not None and token.kind == "word" and token.value == word

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            _fail("ends too early")
        self.pos += 1
        return token

    def expect_keyword(self, word: str) -> None:
        token = self.take()
        if token.kind != "word" or token.value != word:
            _fail(f"expected {word!r}, found {token.value[:40]!r}")

    def parse(self) -> Predicate:
        test = self.parse_or()
        if self.peek() is not None:
            _fail(f"unexpected {self.take().value[:40]!r}")
        return test

    def parse_or(self) -> Predicate:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            _fail(f"is nested more than {MAX_DEPTH} deep")
        parts = [self.parse_and()]
        while self.keyword("or"):
            self.pos += 1
            parts.append(self.parse_and())
        self.depth -= 1
        if len(parts) == 1:
            return parts[0]
        return lambda row: any(p(row) for p in parts)

    def parse_and(self) -> Predicate:
        parts = [self.parse_not()]
        while self.keyword("and"):
            self.pos += 1
            parts.append(self.parse_not())
        if len(parts) == 1:
            return parts[0]
        return lambda row: all(p(row) for p in parts)

    def parse_not(self) -> Predicate:
        if self.keyword("not"):
            self.pos += 1
            self.depth += 1
            if self.depth > MAX_DEPTH:
                _fail(f"is nested more than {MAX_DEPTH} deep")
            inner = self.parse_not()
            self.depth -= 1
            return lambda row: not inner(row)
        token = self.peek()
        if token is not None and token.kind == "(":
            self.pos += 1
            inner = self.parse_or()
            closing = self.take()
            if closing.kind != ")":
                _fail(f"expected ')', found {closing.value[:40]!r}")
            return inner
        return self.parse_match()

    def selector(self) -> tuple[str, Callable[[Row], Any], str]:
        token = self.take()
        if token.kind != "word" or token.value in _KEYWORDS:
            _fail(f"expected a selector, found {token.value[:40]!r}")
        keys, kind = _resolve(token.value, self.schema)
        return token.value, _getter(keys, kind), kind

    def value(self) -> str:
        token = self.take()
        if token.kind not in ("str", "word") or (token.kind == "word" and token.value in _KEYWORDS):
            _fail(f"expected a value, found {token.value[:40]!r}")
        return token.value

    def parse_match(self) -> Predicate:
        first = self.peek()
        if first is None:
            _fail("ends too early")
        # "value" [not] in Selector
        if (
            first.kind == "str"
            or self.keyword("in", 1)
            or (self.keyword("not", 1) and self.keyword("in", 2))
        ):
            value = self.value()
            negate = self.keyword("not")
            if negate:
                self.pos += 1
            self.expect_keyword("in")
            name, get, kind = self.selector()
            return self._contains(name, get, kind, value, negate)
        name, get, kind = self.selector()
        token = self.take()
        if token.kind in ("==", "!="):
            if kind not in (STR, INT, BOOL):
                _fail(f"{token.kind} does not apply to {name}, a {kind}; use in or contains")
            expected = _typed(self.value(), kind, name)
            if token.kind == "==":
                return lambda row: get(row) == expected
            return lambda row: get(row) != expected
        if token.kind != "word":
            _fail(f"expected an operator after {name}, found {token.value[:40]!r}")
        if token.value == "is":
            negate = self.keyword("not")
            if negate:
                self.pos += 1
            self.expect_keyword("empty")
            if kind not in (STR, LIST, MAP, OBJECTS):
                _fail(f"'is empty' does not apply to {name}, a {kind}")
            if negate:
                return lambda row: get(row) not in (None, "", [], {})
            return lambda row: get(row) in (None, "", [], {})
        negate = token.value == "not"
        if negate:
            token = self.take()
        if token.kind == "word" and token.value == "contains":
            return self._contains(name, get, kind, self.value(), negate)
        if token.kind == "word" and token.value == "matches":
            if kind != STR:
                _fail(f"matches does not apply to {name}, a {kind}")
            pattern = _pattern(self.value())

            def matches(row: Row) -> bool:
                found = get(row)
                return isinstance(found, str) and pattern.search(found) is not None

            if negate:
                return lambda row: not matches(row)
            return matches
        _fail(f"operator {token.value[:40]!r} after {name} is not supported")

    @staticmethod
    def _contains(
        name: str, get: Callable[[Row], Any], kind: str, value: str, negate: bool
    ) -> Predicate:
        if kind not in (STR, LIST, MAP):
            _fail(f"in and contains do not apply to {name}, a {kind}")

        def contains(row: Row) -> bool:
            found = get(row)
            return value in found

        if negate:
            return lambda row: not contains(row)
        return contains


@dataclass(frozen=True, slots=True)
class Filter:
    text: str
    test: Predicate


def compile_filter(text: str, schema: Schema) -> Filter:
    """``text`` as a test over rows shaped as ``schema``; FilterError (400) names the fault."""
    if len(text) > MAX_FILTER:
        _fail(f"is longer than {MAX_FILTER} characters")
    tokens = tokenize(text)
    if not tokens:
        _fail("is empty")
    return Filter(text, _Parser(tokens, schema).parse())
