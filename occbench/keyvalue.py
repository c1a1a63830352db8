"""KEY=VALUE pairs from the command line (model options, protocol overrides, loss weights): one parser."""
from __future__ import annotations

import tomllib

from occbench.errors import UserError


EXAMPLES = {"--set": "stride=20", "--loss-weight": "3d=5"}   # shown in the error message, per option


def parse_pair(text: str, option: str = "-o") -> tuple[str, object]:
    """``"stride=20"`` -> ``("stride", 20)``. The value is read as a TOML value (``20``, ``0.5``, ``true``,
    ``[1, 2]``, ``"quoted"``); Python's ``True``/``False`` are booleans too (the string "False" would be
    truthy); anything else (``resnet50``, ``3x256``) stays the string it was typed as. ``option`` names the
    command-line option in the error message."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        example = EXAMPLES.get(option, "backbone=resnet50")
        raise UserError(f"{option} {text!r}: expected KEY=VALUE (e.g. {option} {example})")
    if raw in ("True", "False"):
        return key, raw == "True"
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def parse_pairs(pairs, option: str = "-o") -> dict:
    """Repeated KEY=VALUE options -> dict (a later KEY wins)."""
    return dict(parse_pair(text, option) for text in pairs)
