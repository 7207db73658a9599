"""Find the line of a key, an array item or a syntax error in TOML text, for `file:line` issues."""

from __future__ import annotations

import re
import tomllib

__all__ = ["item_line", "key_lines", "split_key", "syntax_error"]

_DECODE_AT = re.compile(r"\s*\(at line (\d+), column \d+\)$")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BASIC_KEY = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_LITERAL_KEY = re.compile(r"'[^'\n]*'")
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')
"""A one-line string or a comment: a comment swallows any quote after its `#`."""


def split_key(text: str) -> tuple[tuple[str, ...], str] | None:
    """Parse the dotted TOML key at the start of text; return its parts and the rest."""
    parts: list[str] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        for pattern in (_BASIC_KEY, _LITERAL_KEY, _BARE_KEY):
            match = pattern.match(text, pos)
            if match is not None:
                break
        else:
            return None
        token = match.group(0)
        if token[0] == '"':
            # Let tomllib undo the escapes so the key matches the parsed one exactly.
            token = tomllib.loads(f"k = {token}")["k"]
        elif token[0] == "'":
            token = token[1:-1]
        parts.append(token)
        pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return tuple(parts), text[pos:]


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map table headers and keys to their first line, as well as a line scan can tell."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_string: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if open_string is not None:
            if open_string in line:
                open_string = None
            continue
        stripped = line.strip()
        if stripped.startswith("["):
            parsed = split_key(stripped.lstrip("["))
            if parsed is not None and parsed[1].lstrip().startswith("]"):
                table = parsed[0]
                # A header also defines its parent tables when they have no header of their own.
                for end in range(1, len(table) + 1):
                    lines.setdefault(table[:end], number)
            continue
        parsed = split_key(stripped)
        if parsed is None or not parsed[1].lstrip().startswith("="):
            continue
        for end in range(1, len(parsed[0]) + 1):
            lines.setdefault(table + parsed[0][:end], number)
        value = parsed[1].lstrip()[1:].lstrip()
        for quotes in ('"""', "'''"):
            if value.startswith(quotes) and value.count(quotes) == 1:
                open_string = quotes
    return lines


def item_line(text: str, key_line: int, index: int) -> int:
    """Return the line of string item `index` of the array of one-line strings at key_line.

    Falls back to key_line when the items are not all one-line strings.
    """
    lines = text.splitlines()
    if not 0 < key_line <= len(lines):
        return key_line
    seen = 0
    for number in range(key_line, len(lines) + 1):
        line = lines[number - 1]
        if number == key_line:
            line = line.partition("=")[2]
        for token in _TOKEN.findall(line):
            if token.startswith("#"):
                continue
            if seen == index:
                return number
            seen += 1
        if "]" in _TOKEN.sub("", line):
            break  # the array closed before reaching the item
    return key_line


def syntax_error(exc: tomllib.TOMLDecodeError, path: str) -> tuple[str, str]:
    """Return (`file:line`, problem) for a TOML syntax error."""
    message = str(exc)
    match = _DECODE_AT.search(message)
    where = f"{path}:{match.group(1)}" if match else path
    return where, f"TOML syntax error: {_DECODE_AT.sub('', message)}"
