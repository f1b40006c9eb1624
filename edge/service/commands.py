"""Commands received on ``<prefix>/cmd/<name>``: validated before anything is done with them.

Each payload must be a JSON object of at most ``MAX_PAYLOAD`` bytes matching its command's
schema (unknown keys refused). Every command gets a reply on ``<prefix>/cmd/<name>/result``
(:func:`cellseg.edge.service.contract.reply`: the request's id, ``ok``, and ``error`` when refused).
A bad command is answered with the reason and changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellseg.edge.errors import CommandError

MAX_PAYLOAD = 64 * 1024
# Commands are flat objects; anything nested deeper is refused before parsing. (30,000 '[' under
# the size limit made json.loads raise RecursionError, which escaped into paho's network thread.)
MAX_NESTING = 8
MAX_NAME_IN_REPLY = 64


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(None, max_length=128, description="echoed in the reply")


class SnapshotRequest(_Request):
    format: Literal["jpeg"] = "jpeg"
    quality: int = Field(85, ge=10, le=100)


class ReloadRequest(_Request):
    pass


class FlashRequest(_Request):
    url: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="http(s):// URL of the bundle (file:// when flash.allow_file_urls)",
    )
    sha256: str = Field(..., pattern=r"^[0-9a-fA-F]{64}$", description="the bundle file's sha256")


class GrowthPlotRequest(_Request):
    series: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="whose growth to draw (default: the device's series)")  # fmt: skip


SCHEMAS: dict[str, type[_Request]] = {"snapshot": SnapshotRequest, "reload": ReloadRequest, "flash": FlashRequest,
                                      "growth_plot": GrowthPlotRequest}  # fmt: skip


@dataclass(frozen=True)
class Command:
    name: str
    request: _Request


def parse_command(name: str, payload: bytes) -> Command:
    """Validate one command; raises CommandError with a reason fit for the reply."""
    if len(payload) > MAX_PAYLOAD:
        raise CommandError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CommandError(f"payload is not UTF-8 text: {e}") from e
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        raise CommandError(f"payload nests {depth} levels deep; commands are flat JSON objects (at most {MAX_NESTING})")
    try:
        data: Any = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise CommandError(f"payload is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise CommandError(f"payload must be a JSON object, got {type(data).__name__}")
    request_id = data.get("id") if isinstance(data.get("id"), str) else None
    schema = SCHEMAS.get(name)
    if schema is None:
        known = ", ".join(sorted(SCHEMAS))
        shown = name if len(name) <= MAX_NAME_IN_REPLY else name[:MAX_NAME_IN_REPLY] + "..."
        raise CommandError(f"unknown command {shown!r} (known: {known})", request_id)
    try:
        return Command(name, schema.model_validate(data))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'payload'}: {err['msg']}" for err in e.errors())
        raise CommandError(problems, request_id) from e


def nesting_depth(text: str) -> int:
    """The deepest nesting of JSON arrays and objects in ``text`` (brackets inside strings do not
    count); linear in the text, no recursion, so it is safe on any input."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
