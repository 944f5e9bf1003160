"""The entity registry (``include/schemas/entities.yaml``) and the JSON Schemas beside it."""

from __future__ import annotations

import functools
import json
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
        for listed in ("statuses", "children"):
            if listed in merged:
                merged[listed] = tuple(merged[listed])
        out[name] = Entity(name=name, **merged)
    return out


def entity(name: str) -> Entity:
    try:
        return entities()[name]
    except KeyError:
        raise KeyError(f"unknown entity {name!r}; the registry knows {', '.join(entities())}") from None
