"""The entity registry (``include/schemas/entities.yaml``) and the JSON Schemas beside it."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

INCLUDE = Path(__file__).resolve().parents[2] / "include"
SCHEMAS = INCLUDE / "schemas"


@dataclass(frozen=True)
class Entity:
    name: str
    endpoint: str
    key: str
    strategy: str
    schema: str
    cursor: str | None = None
    transform: str | None = None
    reconcile: dict | None = None
    children: tuple = ()
    statuses: tuple = (None,)
    params: dict = field(default_factory=dict)
    poll_seconds: float = 1
    overlap_seconds: int = 60
    per_page: int = 100
    settle_seconds: int = 0
    paged: bool = True
    map_to_list: bool = False
    scan_every_minutes: int = 10
    reconcile_every_minutes: int = 60
    max_quiet_seconds: float = 300
    quiet_after_seconds: float = 300  # no change for this long: poll every quiet_poll_seconds instead
    quiet_poll_seconds: float = 20
    scan_share: float = 0.1  # id_scan: the rolling scan's share of the live request budget
    scan_pages_per_cycle: int = 100  # id_scan: at most this many scan pages in one cycle
    live_apply_max_rows: int = 500  # a live landing this small applies its transform itself (crm_transform: larger)
    live_apply_lock_wait_seconds: float = 1.0  # how long it waits behind a running transform before leaving it
    stay_while_busy_seconds: float = 240  # a landing task keeps landing while the store keeps changing, up to this
    busy_quiet_seconds: float = 10  # ... and hands over to the trigger after this long without a change
    first_load_wait_seconds: float = 120  # a watch task's first load waits this long for the entities before it
    children_per_cycle: int = 10  # a live cycle reads the children (notes) of at most this many parents
    transform_sessions: int = 1  # sessions side by side for a step with more than a batch waiting
    mapped: tuple = ()  # field patterns the transform maps ("billing.city", "line_items[].id")
    derived: tuple = ()  # field patterns the store computes on read from data the CRM keeps: not kept again
    volatile: tuple = ()  # top-level fields that change on every read: stored, not part of the version hash

    def with_children(self) -> list[str]:
        """This entity and those its landing writes with it (``children``: order notes with orders)."""
        return [self.name, *(c["entity"] for c in self.children if c["entity"] != self.name)]

    def field_map(self) -> dict[str, str]:
        """pattern -> 'column' (mapped or derived, with all below it: named, so not kept as an unmapped
        field), 'object' or 'array' (on the way to a named field)."""
        out: dict[str, str] = dict.fromkeys(self.mapped + self.derived, "column")
        for pattern in self.mapped + self.derived:
            for cut in re.finditer(r"\.|\[\]", pattern):
                if cut.start():
                    out.setdefault(pattern[:cut.start()], "object" if cut.group() == "." else "array")
        return out

    def problem(self, record: Any) -> str | None:
        """Why ``record`` fails this entity's JSON Schema, or None when it is fine."""
        return _validator(self.schema)(record)


@functools.cache
def _validator(schema_file: str):
    """A compiled validator (fastjsonschema: ~10x faster than interpreting the schema per record)."""
    import fastjsonschema
    from jsonschema import Draft202012Validator

    schema = json.loads((SCHEMAS / schema_file).read_text())
    Draft202012Validator.check_schema(schema)  # a broken schema fails loudly, at first use
    check = fastjsonschema.compile(schema)

    def problem(record: Any) -> str | None:
        try:
            check(record)
        except fastjsonschema.JsonSchemaValueException as exc:
            message = exc.message  # "data.total must be …" / "data must contain …": the field, or the record
            return message[5:] if message.startswith("data.") else message.replace("data ", "record ", 1)
        return None

    return problem


@functools.cache
def entities() -> dict[str, Entity]:
    doc = yaml.safe_load((SCHEMAS / "entities.yaml").read_text())
    defaults: dict[str, Any] = doc.get("defaults", {})
    out = {}
    for name, spec in doc["entities"].items():
        merged = {**defaults, **spec}
        for listed in ("statuses", "children", "volatile"):
            if listed in merged:
                merged[listed] = tuple(merged[listed])
        for listed in ("mapped", "derived"):
            if listed in merged:
                merged[listed] = tuple(flatten_paths(merged[listed]))
        out[name] = Entity(name=name, **merged)
    return out


def flatten_paths(items: list, prefix: str = "") -> list[str]:
    """``[id, {billing: [city]}, {"line_items[]": [id]}]`` -> ``id, billing.city, line_items[].id``."""
    out = []
    for item in items:
        if isinstance(item, dict):
            for key, inner in item.items():
                out += flatten_paths(inner, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{item}")
    return out


@functools.cache
def field_map_rows() -> tuple[list[str], list[str], list[str]]:
    """Every entity's field map as three columns (entity, pattern, what), for ``pg_temp.field_map``."""
    rows = [(name, pattern, what) for name, spec in entities().items() for pattern, what in spec.field_map().items()]
    return tuple(list(col) for col in zip(*rows, strict=True)) if rows else ([], [], [])


def entity(name: str) -> Entity:
    try:
        return entities()[name]
    except KeyError:
        raise KeyError(f"unknown entity {name!r}; the registry knows {', '.join(entities())}") from None
