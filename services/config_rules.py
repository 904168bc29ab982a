"""What every setting shares: its names (env variable, CLI flag), its error, and the
rules its value must follow, named in its field's metadata: one home for each rule's
test, its error message and how the configuration page shows it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "PROMPTREC_"


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


class ConfigError(ValueError):
    """A setting has a value the service cannot start with."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"invalid setting {setting!r} ({env_name(setting)}): {message}")
        self.setting = setting


def opt(default: Any, help_text: str, rule: str = "") -> Any:
    return field(default=default, metadata={"help": help_text, "rule": rule})


@dataclass(frozen=True)
class Rule:
    allows: Callable[[Any], bool]
    message: str  # the error: "must be ...", followed by ", got <value>"
    shown: str  # docs/configuration.md

    @classmethod
    def named(cls, name: str) -> Rule:
        """`>=1`, `>0`, `>=0`, `port`, `rate`, `share`, `level`, `file`, or `in:a,b` (exactly those
        values)."""
        if name.startswith("in:"):
            allowed = name[3:].split(",")
            return cls(lambda v: v in allowed, f"must be one of {', '.join(allowed)}",
                       f"one of {', '.join(allowed)}")
        try:
            return RULES[name]
        except KeyError:
            raise ValueError(f"no rule named {name!r}") from None


RULES = {
    ">=1": Rule(lambda v: v >= 1, "must be >= 1", "≥ 1"),
    ">0": Rule(lambda v: v > 0, "must be > 0", "> 0"),
    ">=0": Rule(lambda v: v >= 0, "must be >= 0", "≥ 0"),
    "port": Rule(lambda v: 0 < v < 65536, "must be a TCP port", "TCP port (1–65535)"),
    "rate": Rule(lambda v: 0 < v <= 1, "must be in (0, 1]", "in (0, 1]"),
    "share": Rule(lambda v: 0 <= v < 1, "must be in [0, 1)", "in [0, 1)"),
    "level": Rule(lambda v: 0 < v < 1, "must be in (0, 1)", "in (0, 1)"),
    # A URI (s3://...) is opened, and checked, when it is read.
    "file": Rule(lambda v: not v or "://" in v or Path(v).is_file(),
                 "must be an existing file or a URI", "empty, an existing file or a URI"),
}
