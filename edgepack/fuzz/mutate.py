"""Ways to damage what a bundle holds: bytes (any file) and parsed JSON (manifests, reports).
Every function draws from the random.Random it is given, so a case replays from its seed."""

from __future__ import annotations

import json
import random
from typing import Any

MUTATIONS = ("bitflip", "byte-set", "overwrite", "zero-run", "truncate", "insert", "delete", "duplicate")
JSON_MUTATIONS = ("drop-key", "null", "wrong-type", "huge-number", "negative", "non-finite", "long-string",
                  "deep-nesting", "control-chars", "empty-list", "path-escape")
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)


def _offset(rng: random.Random, size: int) -> int:
    if size <= 0:
        return 0
    if rng.random() < 0.25:  # headers, magic numbers and root offsets live at the start
        return rng.randrange(min(size, 64))
    return rng.randrange(size)


def mutate(data: bytes, mutation: str, rng: random.Random) -> tuple[bytes, str]:
    """Damage ``data``; returns the new bytes and what was done."""
    buf = bytearray(data)
    size = len(buf)
    if mutation == "bitflip":
        spots = [_offset(rng, size) for _ in range(rng.randint(1, 8))]
        for spot in spots:
            buf[spot] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flipped bits at {sorted(spots)}"
    if mutation == "byte-set":
        spots = [_offset(rng, size) for _ in range(rng.randint(1, 16))]
        for spot in spots:
            buf[spot] = rng.choice(INTERESTING_BYTES)
        return bytes(buf), f"set bytes at {sorted(spots)}"
    start = _offset(rng, size)
    length = rng.randint(1, 256)
    if mutation == "overwrite":
        buf[start:start + length] = rng.randbytes(len(buf[start:start + length]))
        return bytes(buf), f"overwrote {length} bytes at {start}"
    if mutation == "zero-run":
        buf[start:start + length] = bytes(len(buf[start:start + length]))
        return bytes(buf), f"zeroed {length} bytes at {start}"
    if mutation == "truncate":
        cut = rng.randrange(size) if size else 0
        return bytes(buf[:cut]), f"truncated to {cut} of {size} bytes"
    if mutation == "insert":
        return bytes(buf[:start] + rng.randbytes(length) + buf[start:]), f"inserted {length} bytes at {start}"
    if mutation == "delete":
        return bytes(buf[:start] + buf[start + length:]), f"deleted {length} bytes at {start}"
    if mutation == "duplicate":
        source = rng.randrange(size) if size else 0
        chunk = buf[source:source + length]
        return bytes(buf[:start] + chunk + buf[start:]), f"copied {len(chunk)} bytes from {source} to {start}"
    raise ValueError(f"unknown mutation {mutation!r}")


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """Every (path) inside parsed JSON that can be replaced: dict keys and list items."""
    found = []
    if isinstance(value, dict):
        for key, child in value.items():
            found.append(path + (key,))
            found.extend(_nodes(child, path + (key,)))
    elif isinstance(value, list):
        for index, child in enumerate(value[:16]):
            found.append(path + (index,))
            found.extend(_nodes(child, path + (index,)))
    return found


def mutate_json(text: str, mutation: str, rng: random.Random) -> tuple[str, str]:
    """Change one value of a JSON document the way a careless or hostile edit would; returns the
    new text (which may hold NaN or be nested beyond any parser's patience) and what was done."""
    value = json.loads(text)
    nodes = _nodes(value)
    if not nodes:
        return text, "nothing to change"
    path = rng.choice(nodes)
    parent = value
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    where = "/".join(str(p) for p in path)
    if mutation == "drop-key" and isinstance(parent, dict):
        del parent[key]
        return json.dumps(value), f"dropped {where}"
    replacement: Any = {
        "null": None,
        "wrong-type": rng.choice([{"a": 1}, [1, 2], "text", 7, True]),
        "huge-number": rng.choice([10 ** 30, 1e308, 2 ** 63]),
        "negative": rng.choice([-1, -1e-9, -(2 ** 40)]),
        "non-finite": float(rng.choice(["nan", "inf", "-inf"])),
        "long-string": "A" * rng.choice([10_000, 1_000_000]),
        "empty-list": [],
        "control-chars": "\x1b[31m\x00\x07bad\x1b[0m",
        "path-escape": rng.choice(["../../etc/passwd", "/etc/passwd", "golden/../../x", "a\\b", "device/../../y"]),
    }.get(mutation)
    if mutation == "deep-nesting":
        depth = rng.choice([100, 5_000, 100_000])
        text = json.dumps(value)
        marker = json.dumps(parent[key]) if key in (parent if isinstance(parent, dict) else range(len(parent))) else None
        nested = "[" * depth + "0" + "]" * depth
        if marker is not None and marker in text:
            return text.replace(marker, nested, 1), f"nested {where} {depth} deep"
        return text, "nothing to change"
    if mutation == "drop-key":
        replacement = None
    parent[key] = replacement
    return json.dumps(value, allow_nan=True), f"{mutation} at {where}"
