"""Turn a YAML profile, a wsnic.conf and command-line flags into one validated Profile.

Precedence is the original's: defaults < configuration file < command-line flags. Every source is
first turned into a plain nested dict; the dicts are deep-merged and validated once, so a
validation error still names the field and can be traced back to where its value came from: a
line of the YAML file, a line of the wsnic.conf, or a flag.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from wsnic.config.models import Profile
from wsnic.config.seed import (
    SEED_BY_KEY,
    FieldPath,
    default_conf_path,
    flag_values,
    format_field_path,
    in_container,
    parse_wsnic_conf,
    seed_defaults,
    seed_overrides,
)
from wsnic.errors import ConfigError

YAML_SUFFIXES = frozenset({".yaml", ".yml"})
CONF_SUFFIXES = frozenset({".conf"})

# Profile fields that name files; "*" stands for every item of a list.
_FILE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("server", "tls", "certificate"),
    ("server", "tls", "private_key"),
    ("networks", "*", "dhcp", "lease_file"),
    ("state_dir",),
)
_INPUT_PREVIEW = 60


# --- YAML with line numbers -------------------------------------------------------------------

class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader minus YAML 1.1's base-60 numbers (which turn MAC 12:34:56:00:00:01 into an int),
    and with duplicate keys rejected instead of silently keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            if key_node.value in first:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key_node.value!r} (first given on line "
                    f"{first[key_node.value].start_mark.line + 1})",
                    key_node.start_mark,
                )
            first[key_node.value] = key_node
        return super().construct_mapping(node, deep)


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_ProfileLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ProfileLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?0[0-7_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"),
)
_ProfileLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _read_yaml(path: Path, display: Path) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node tree (which knows the line of every key and item)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{display}: profile not found") from None
    except OSError as exc:
        raise ConfigError(f"{display}: cannot read the profile: {exc.strerror}") from None
    loader = _ProfileLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{display}{line}: YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{display}: YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    return data, node


def _yaml_line(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """The line of the deepest YAML key or item on the path `loc` (1-based)."""
    line: int | None = None
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                    line, child = key_node.start_mark.line + 1, value_node
                    break
        elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
              and 0 <= part < len(node.value)):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


# --- merging and paths ------------------------------------------------------------------------

def deep_merge(base: Any, override: Any) -> Any:
    """Merge `override` into `base` without mutating either.

    Dicts merge key by key. A dict whose keys are all ints patches the items of a list by index
    (`{"networks": {0: {...}}}` changes only the first network). Anything else replaces. A base
    of the wrong shape is kept, so validation still reports it where the file wrote it.
    """
    if isinstance(override, dict) and override and all(isinstance(k, int) for k in override):
        if base is not None and not isinstance(base, list | tuple):
            return base
        items = list(base or [])
        for index, value in sorted(override.items()):
            while len(items) <= index:
                items.append({})
            items[index] = deep_merge(items[index], value)
        return items
    if isinstance(override, dict):
        if base is not None and not isinstance(base, dict):
            return base
        out = dict(base or {})
        for key, value in override.items():
            out[key] = deep_merge(out.get(key), value)
        return out
    return override


def _resolve_file_fields(data: Any, base: Path) -> None:
    """Make relative file names in a profile's dict absolute against `base`, in place."""

    def walk(node: Any, path: tuple[str, ...]) -> None:
        head, rest = path[0], path[1:]
        if head == "*":
            for item in node if isinstance(node, list) else []:
                walk(item, rest)
            return
        if not isinstance(node, dict) or head not in node:
            return
        if rest:
            walk(node[head], rest)
        elif isinstance(node[head], str) and not Path(node[head]).is_absolute():
            node[head] = str(base / node[head])

    for file_field in _FILE_FIELDS:
        walk(data, file_field)


# --- errors -----------------------------------------------------------------------------------

def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that validates the object at `loc`, if one does."""
    current: type[BaseModel] | None = Profile
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a tuple: its model was found when the field was entered
        if current is None or part not in current.model_fields:
            return None
        current = _model_in(current.model_fields[part].annotation)
    return current


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _INPUT_PREVIEW else text[: _INPUT_PREVIEW - 3] + "..."


def _message(err: ErrorDetails) -> str:
    kind, msg, loc = err["type"], err["msg"], err["loc"]
    if kind == "value_error":
        # Our own validators' messages already quote the value and say what is valid.
        return msg.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        model = _model_at(tuple(loc[:-1]))
        valid = f"; valid keys here: {', '.join(model.model_fields)}" if model else ""
        return f"unknown key {loc[-1]!r}{valid}"
    if kind == "missing":
        return "required but missing"
    if kind == "path_type":
        msg = "Input should be a file path (a string)"
    return f"{msg}, got {_preview(err['input'])}"


def _is_derived(err: ErrorDetails, errors: list[ErrorDetails]) -> bool:
    """A too_short on a list that only happened because one of its items failed validation."""
    if err["type"] != "too_short":
        return False
    loc = err["loc"]
    return any(len(o["loc"]) > len(loc) and o["loc"][: len(loc)] == loc for o in errors)


def _problems(exc: ValidationError, locate: Callable[[FieldPath], str]) -> list[str]:
    errors = exc.errors(include_url=False)
    return [
        f"{locate(tuple(e['loc']))}: {format_field_path(tuple(e['loc']))}: {_message(e)}"
        for e in errors
        if not _is_derived(e, errors)
    ]


@dataclass
class _Origins:
    """Where each value came from, to name it in an error."""

    fallback: str
    yaml_file: Path | None = None
    yaml_node: yaml.Node | None = None
    # Field path -> "wsnic.conf:7" or "command line -s/--subnet"; later sources overwrite.
    labels: dict[FieldPath, str] = field(default_factory=dict)

    def locate(self, loc: FieldPath) -> str:
        for end in range(len(loc), 0, -1):
            label = self.labels.get(loc[:end])
            if label is not None:
                return label
        if self.yaml_file is not None:
            line = _yaml_line(self.yaml_node, loc)
            return f"{self.yaml_file}:{line}" if line else str(self.yaml_file)
        return self.fallback


def _validate(data: Any, origins: _Origins, sources: str) -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = _problems(exc, origins.locate)
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        raise ConfigError(f"invalid configuration from {sources} ({count})", problems) from None


# --- public API -------------------------------------------------------------------------------

def detect_format(path: Path) -> Literal["yaml", "conf"]:
    """`.yaml`/`.yml` is a profile, `.conf` a wsnic.conf; anything else is sniffed:
    a line `key = value` makes it a wsnic.conf (YAML writes `key: value`)."""
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return "yaml"
    if suffix in CONF_SUFFIXES:
        return "conf"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return "yaml"
    key_equals = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\s*=")
    return "conf" if any(key_equals.match(line) for line in text.splitlines()) else "yaml"


def _load_yaml_layer(path: Path, cwd: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    real = path if path.is_absolute() else cwd / path
    data, node = _read_yaml(real, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: a profile is a mapping of keys (name, server, networks, ...), "
            f"not a {type(data).__name__}"
        )
    _resolve_file_fields(data, real.parent.absolute())
    return data, node


def load_profile_file(path: Path, *, cwd: Path | None = None) -> Profile:
    """Load and validate a YAML profile; relative file names resolve against its folder."""
    data, node = _load_yaml_layer(path, cwd or Path.cwd())
    return _validate(data, _Origins(str(path), path, node), str(path))


def _labels(values: Mapping[str, object], label: Callable[[str], str]) -> dict[FieldPath, str]:
    return {SEED_BY_KEY[k].path: label(k) for k, v in values.items() if v is not None}


def _choose_file(
    profile_path: Path | None, conf_arg: str | None, *, cwd: Path, container: bool, root: Path
) -> tuple[Path | None, Path | None]:
    """(YAML profile, wsnic.conf): at most one of them; paths as the user gave them."""
    if profile_path is not None:
        real = profile_path if profile_path.is_absolute() else cwd / profile_path
        if not real.is_file():
            raise ConfigError(f"{profile_path}: profile not found")
        if conf_arg is not None:
            raise ConfigError(
                f"both a profile ({profile_path}) and -c {conf_arg} are given; use one of them"
            )
        return (profile_path, None) if detect_format(real) == "yaml" else (None, profile_path)
    if conf_arg is not None:
        conf_path = Path(conf_arg)
        if not (conf_path if conf_path.is_absolute() else cwd / conf_path).is_file():
            raise ConfigError(f'configuration file "{conf_arg}" not found (-c)')
        return None, conf_path
    found = default_conf_path(cwd=cwd, container=container, root=root)
    if found is not None and found.is_relative_to(cwd):
        found = found.relative_to(cwd)  # say "wsnic.conf", as the user knows it
    return None, found


def _seed_data(
    conf_path: Path | None,
    flags: Mapping[str, object],
    origins: _Origins,
    warnings: list[str],
    *,
    cwd: Path,
    container: bool,
    root: Path,
) -> tuple[dict[str, Any], dict[str, object]]:
    """Environment defaults and wsnic.conf merged (flags come later); also the conf's values."""
    conf_values: dict[str, object] = {}
    conf_lines: dict[str, int] = {}
    if conf_path is not None:
        conf = parse_wsnic_conf(
            conf_path if conf_path.is_absolute() else cwd / conf_path, display=conf_path
        )
        warnings.extend(conf.warnings)
        conf_values, conf_lines = conf.values, conf.lines
        origins.fallback = str(conf_path)
    defaults = seed_defaults(cwd=cwd, container=container, root=root)
    # The original used a key file only along with a certificate; alone it would be an error.
    effective = {**defaults, **{k: v for k, v in conf_values.items() if v is not None}, **flags}
    if effective.get("wss_certificate") is None:
        defaults.pop("wss_private_key", None)
    data = seed_overrides(defaults)
    origins.labels.update(_labels(defaults, lambda k: f"default {k}"))
    if conf_path is not None:
        data = deep_merge(data, seed_overrides(conf_values, base=cwd))
        origins.labels.update(_labels(
            conf_values,
            lambda k: f"{conf_path}:{conf_lines[k]}" if k in conf_lines else str(conf_path),
        ))
    return data, conf_values


def build_profile(
    profile_path: Path | None,
    args: argparse.Namespace | None,
    *,
    cwd: Path | None = None,
    container: bool | None = None,
    root: Path = Path("/"),
) -> tuple[Profile, list[str]]:
    """The profile from a file (YAML profile or wsnic.conf) and the seed flags in `args`.

    The configuration file is `profile_path` (a YAML profile or a .conf) or `-c CFGFILE`; with
    neither, wsnic.conf is looked up as the original did. Flags override the first network and
    the server of either kind of file. The original's environment defaults (listen on 0.0.0.0 in
    a container, a certificate from cert/ when it exists) apply only without a YAML profile: a
    profile states its own server and stays the same wherever it runs.
    Returns the profile and warnings for the user (unknown wsnic.conf keys, ineffective flags).
    """
    cwd = cwd or Path.cwd()
    container = in_container(root) if container is None else container
    conf_arg = getattr(args, "wsnic_conf", None) if args is not None else None
    yaml_path, conf_path = _choose_file(
        profile_path, conf_arg, cwd=cwd, container=container, root=root
    )
    flags = flag_values(args) if args is not None else {}
    warnings: list[str] = []
    origins = _Origins(fallback="configuration")
    conf_values: dict[str, object] = {}
    data: Any
    if yaml_path is not None:
        data, origins.yaml_node = _load_yaml_layer(yaml_path, cwd)
        origins.yaml_file = yaml_path
    else:
        data, conf_values = _seed_data(conf_path, flags, origins, warnings,
                                       cwd=cwd, container=container, root=root)
    sources = [str(p) for p in (yaml_path, conf_path) if p is not None]
    if flags:
        data = deep_merge(data, seed_overrides(flags, base=cwd))
        origins.labels.update(
            _labels(flags, lambda k: f"command line {SEED_BY_KEY[k].flag_label}")
        )
        sources.append("the command line")

    profile = _validate(data, origins, " and ".join(sources) or "the built-in defaults")
    uplink_given = "inet_iface" in flags or conf_values.get("inet_iface") is not None
    if uplink_given and not profile.networks[0].nat.enabled:
        warnings.append(
            f"inet_iface {profile.networks[0].nat.uplink} has no effect without enable_inet "
            "(-i/--enable-inet)"
        )
    return profile, warnings
