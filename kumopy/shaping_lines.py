"""Locate keys, items of arrays and [[array]] tables in a shaping file's text, as `file:line`."""

from __future__ import annotations

from kumopy.toml_lines import key_lines, split_key

__all__ = ["Lines", "array_item_line"]


def array_item_line(text: str, key_line: int, index: int) -> int:
    """Return the line where item `index` of the array value at key_line starts.

    Falls back to key_line when the array cannot be followed (then the key's line is the best
    that can be said).
    """
    lines = text.splitlines()
    if not 0 < key_line <= len(lines):
        return key_line
    depth, seen, quote, in_item = 0, -1, "", False
    for number in range(key_line, len(lines) + 1):
        line = lines[number - 1]
        pos = line.find("=") + 1 if number == key_line else 0
        while pos < len(line):
            char = line[pos]
            if quote:
                if char == "\\" and quote == '"':
                    pos += 1
                elif char == quote:
                    quote = ""
            elif char == "#":
                break
            elif char in "[{" and depth == 0:
                depth = 1
            elif char in "]}" and depth == 1:
                return key_line  # the array closed before reaching the item
            elif char == "," and depth == 1:
                in_item = False
            elif not char.isspace():
                if depth == 1 and not in_item:
                    in_item, seen = True, seen + 1
                    if seen == index:
                        return number
                depth += char in "[{"
                depth -= char in "]}"
                if char in "\"'":
                    quote = char
            pos += 1
    return key_line


class Lines:
    """Turn key paths (and items of arrays of tables) into `file:line`."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.lines = text.splitlines()
        self.keys = key_lines(text)
        self.arrays: dict[tuple[str, ...], list[int]] = {}
        for number, line in enumerate(self.lines, start=1):
            stripped = line.strip()
            if stripped.startswith("[["):
                parsed = split_key(stripped[2:])
                if parsed is not None and parsed[1].lstrip().startswith("]]"):
                    self.arrays.setdefault(parsed[0], []).append(number)

    def __call__(self, *keys: str) -> str:
        """Locate a key, or failing that the nearest table that holds it."""
        for end in range(len(keys), 0, -1):
            number = self.keys.get(keys[:end])
            if number is not None:
                return f"{self.path}:{number}"
        return self.path

    def item(self, keys: tuple[str, ...], index: int, key: str | None) -> str:
        """Locate item `index` of an array of tables (or one key of it)."""
        headers = self.arrays.get(keys, [])
        if not 0 <= index < len(headers):
            if key is None:
                return self(*keys)
            return self(*keys, key)
        start = headers[index]
        if key is None:
            return f"{self.path}:{start}"
        for number in range(start + 1, len(self.lines) + 1):
            stripped = self.lines[number - 1].strip()
            if stripped.startswith("["):
                break
            parsed = split_key(stripped)
            if parsed and parsed[0] == (key,) and parsed[1].lstrip().startswith("="):
                return f"{self.path}:{number}"
        return f"{self.path}:{start}"

    def array_item(self, where: str, index: int) -> str:
        """Locate item `index` of the array whose key is at `where`."""
        head, _, number = where.rpartition(":")
        if not number.isdigit():
            return where
        return f"{head}:{array_item_line(self.text, int(number), index)}"
