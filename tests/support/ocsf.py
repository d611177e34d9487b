"""OCSF validation for the tests: `ocsf_errors(event)` / `ocsf_valid(event)` check an event
against the published OCSF 1.3.0 schema, offline.

The schema is the one `ocsf-json-schema` bundles (the OCSF project's 1.3.0 export, made into
JSON Schema 2020-12 per class and profiles); `jsonschema` validates. The class is looked up from
the event's `class_uid`, the profiles are the event's own `metadata.profiles` (what OCSF says an
event declares about itself), and the schema of each (class, profiles) is made once.
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

OCSF_VERSION = "1.3.0"


@functools.cache
def _ocsf() -> OcsfJsonSchemaEmbedded:
    return OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))


@functools.cache
def _validator(class_uid: int, profiles: tuple[str, ...]) -> jsonschema.Draft202012Validator:
    ocsf = _ocsf()
    name = ocsf.lookup_class_name_from_uid(class_uid=class_uid)
    schema = ocsf.get_class_schema(class_name=name, profiles=list(profiles))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def ocsf_errors(event: dict[str, Any]) -> list[str]:
    """What is wrong with `event` as an OCSF 1.3.0 event of its class and profiles ([]: valid)."""
    meta = event.get("metadata") or {}
    if meta.get("version") != OCSF_VERSION:
        return [f"metadata.version is {meta.get('version')!r}, not {OCSF_VERSION}"]
    validator = _validator(event["class_uid"], tuple(meta.get("profiles") or ()))
    return sorted(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(event)
    )


def ocsf_valid(event: dict[str, Any]) -> None:
    errors = ocsf_errors(event)
    assert not errors, f"{event} is not valid OCSF {OCSF_VERSION}: {errors}"
