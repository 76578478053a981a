"""The committed JSON Schema matches the models and describes them."""

from __future__ import annotations

import json

from wsnic.config.models import Profile
from wsnic.config.schema import (
    SCHEMA_PATH,
    SCHEMA_TITLE,
    profile_schema,
    render_schema,
    write_schema,
)


def test_committed_schema_is_current():
    assert SCHEMA_PATH.is_file(), f"{SCHEMA_PATH} is missing: run `wsnic schema --write`"
    committed = SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == render_schema(), (
        f"{SCHEMA_PATH} is stale (the profile models changed): run `wsnic schema --write` "
        "and commit the result"
    )


def test_schema_shape():
    schema = profile_schema()
    assert schema["title"] == SCHEMA_TITLE
    assert "$id" not in schema
    assert schema["$schema"].endswith("/draft/2020-12/schema")
    assert schema["type"] == "object"
    assert set(schema["properties"]) == set(Profile.model_fields)
    # Every model forbids unknown keys, in the schema as in validation.
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name


def test_schema_carries_the_constraints():
    defs = profile_schema()["$defs"]
    assert defs["Server"]["properties"]["ws_port"]["maximum"] == 65535
    assert defs["Server"]["properties"]["ws_port"]["minimum"] == 1
    assert defs["Dhcp"]["properties"]["lease_time"]["exclusiveMinimum"] == 0
    assert profile_schema()["properties"]["networks"]["minItems"] == 1
    assert set(defs["Network"]["properties"]) == {
        "name", "path", "bridge", "subnet", "nat", "dhcp", "iperf"}


def test_rendering_is_stable_and_round_trips(tmp_path):
    text = render_schema()
    assert text == render_schema()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == profile_schema()
    assert text.splitlines()[1] == '  "$schema": "https://json-schema.org/draft/2020-12/schema",'
    target = write_schema(tmp_path / "sub" / "p.schema.json")
    assert target.read_text(encoding="utf-8") == text


def test_schema_default_is_the_default_profile():
    # The documented defaults are those the model applies.
    schema = profile_schema()
    defaults = {k: v["default"] for k, v in schema["properties"].items()}
    assert Profile.model_validate(defaults) == Profile()
