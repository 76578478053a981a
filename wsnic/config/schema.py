"""The JSON Schema of a profile, generated from the pydantic models.

`schemas/profile.schema.json` is committed so editors can validate profiles; a unit test fails
when it no longer matches the models (regenerate it with `wsnic schema --write`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsnic.config.models import Profile

# The repository's copy; only meaningful in a source checkout (editable install).
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "profile.schema.json"
SCHEMA_TITLE = "wsnic profile"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def profile_schema() -> dict[str, Any]:
    """The schema as a dict: pydantic's validation schema with a title and no $id."""
    generated = Profile.model_json_schema(mode="validation")
    generated.pop("$id", None)
    generated["title"] = SCHEMA_TITLE
    generated.setdefault(
        "description",
        "A wsnic profile: the server, the networks and the backends of one wsnic instance.",
    )
    # The dialect first: it is what editors look at.
    return {"$schema": _DIALECT, **generated}


def render_schema() -> str:
    """The schema as stable text: indent 2, keys in generation order, trailing newline."""
    return json.dumps(profile_schema(), indent=2, ensure_ascii=False) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the schema file (creating its folder) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_schema(), encoding="utf-8")
    return path
