"""Reading a sweep file: YAML through a size-, depth- and alias-limited `yaml.SafeLoader`, then the schema
(`schema.SweepSpec`), every error one line naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import NsrError
from .schema import SweepSpec


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "sweep"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; docs/sweep-file.md lists the allowed keys)"
    bad = err.get("input")
    shown = "" if isinstance(bad, (dict, list)) else f" (got {bad!r})"
    if not err["loc"] and re.match(r"^[\w.]+:", msg):
        return msg  # a whole-sweep check whose message already starts with the field it names
    return f"{where}: {msg}{shown}"


def parse_sweep(data: Any, *, source: str = "sweep") -> SweepSpec:
    if not isinstance(data, dict):
        raise NsrError(f"{source}: a sweep file must be a mapping of keys, got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise NsrError(f"{source}: {_format_error(e)}") from None
    return spec


MAX_YAML_BYTES = 1_000_000
MAX_YAML_DEPTH = 50
MAX_YAML_ALIASES = 50
MAX_YAML_NODES = 100_000  # after aliases are expanded: an alias bomb is small on disk, huge in memory


class _LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with limits on nesting and aliases (no file can exhaust the stack or memory)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth, self._aliases = 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _count_nodes(data: Any, limit: int) -> int:
    """Nodes of the loaded data with aliases expanded, stopping once past `limit`."""
    stack, n = [data], 0
    while stack and n <= limit:
        x = stack.pop()
        n += 1
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


def read_yaml(path: Path) -> Any:
    """A YAML file read safely: size, depth, aliases and expanded size limited; never a Python object."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise NsrError(f"{path}: larger than {MAX_YAML_BYTES:,} bytes; a sweep file is a few lines")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LimitedLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise NsrError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if _count_nodes(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise NsrError(f"{path}: expands to more than {MAX_YAML_NODES:,} values (aliases); refused")
    return data


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep file's values checked against the schema (the model-dependent checks are the validation pass's:
    `sweep.validate`)."""
    path = Path(path)
    if not path.is_file():
        raise NsrError(f"sweep file {path} does not exist")
    return parse_sweep(read_yaml(path), source=str(path))


def dump_sweep(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
