"""Where settings come from: defaults, then `PROMPTREC_<NAME>` env vars, then flags.

Names are flat (`history_len`, `--history-len`, `PROMPTREC_HISTORY_LEN`) whatever section
of `Settings` holds them; `load_settings` sorts them into their sections and validates.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, get_type_hints

from services.config import (
    SECTIONS,
    ConfigError,
    Settings,
    env_name,
    flag_name,
    section_of,
    setting_fields,
)


def _types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for section in dataclasses.fields(Settings):
        hints.update(get_type_hints(section.default_factory))
    return hints


def load_settings(env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then `PROMPTREC_*` env vars, then explicit overrides (e.g. CLI flags),
    validated. Overrides that are strings are parsed like env values; None is ignored."""
    env = os.environ if env is None else env
    types = _types()
    values: dict[str, Any] = {}
    for _, f in setting_fields():
        raw = env.get(env_name(f.name))
        if raw is not None:
            values[f.name] = _parse(f.name, types[f.name], raw)
    for name, value in (overrides or {}).items():
        section_of(name)  # an unknown name fails here, naming it
        if value is not None:
            values[name] = _parse(name, types[name], value) if isinstance(value, str) else value
    by_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        by_section[section_of(name)][name] = value
    sections = {f.name: f.default_factory(**by_section[f.name])
                for f in dataclasses.fields(Settings)}
    return Settings(**sections).validate()


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One `--name` flag per setting; the default shown is the built-in one."""
    types = _types()
    group = parser.add_argument_group("settings (each also PROMPTREC_<NAME> in the env)")
    for _, f in setting_fields():
        flag = flag_name(f.name)
        help_text = f"{f.metadata.get('help', '')} [default: {f.default!r}]"
        if types[f.name] is bool:
            group.add_argument(flag, dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, type=str, help=help_text)


def settings_from_flags(namespace: argparse.Namespace, env: Mapping[str, str] | None = None,
                        base: Mapping[str, Any] | None = None) -> Settings:
    """Settings from parsed `add_settings_flags` flags; `base` (a tool's own defaults, by
    flat name) wins over the env and loses to a flag given on the command line."""
    names = {f.name for _, f in setting_fields()}
    overrides = dict(base or {})
    overrides.update({k: v for k, v in vars(namespace).items() if k in names and v is not None})
    return load_settings(env=env, overrides=overrides)


def cli_settings(argv: Sequence[str]) -> Settings:
    """Parse settings flags alone (used by tests and small tools)."""
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    return settings_from_flags(parser.parse_args(list(argv)), env={})


def _parse(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(name, f"cannot parse {raw!r} as {kind.__name__}") from None
