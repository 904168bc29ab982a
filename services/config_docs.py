"""docs/configuration.md, rendered from `Settings`: one table per section.

    python -m services.config_docs > docs/configuration.md     (or: make docs)

tests/test_docs.py fails when the file and this rendering differ.
"""

from __future__ import annotations

import dataclasses
import itertools

from services.config import (
    ENV_PREFIX,
    ConfigError,
    Settings,
    env_name,
    flag_name,
    setting_fields,
)
from services.config_rules import Rule

COMMAND = "python -m services.config_docs > docs/configuration.md"

INTROS = {
    "infra": "Where Kafka and Ray are, which data set, where files live.",
    "streaming": "Topics, Kafka consumers, user-state shards and the per-user state they keep.",
    "items": "The live item topic (catalog changes while serving) and events held for items "
             "not in the catalog yet.",
    "profiles": "Users described in words: the profile topic, and how much profile and query "
                "text is taken ([data.md](data.md)).",
    "model": "The structure of the trainable prompt; every weights blob records these values.",
    "training": "Ray Train rounds: workers, optimiser, schedule and the validation gate.",
    "serving": "Ray Serve replicas, the HTTP API, overload limits, batching and the cache.",
    "live": "Impressions, live metrics from them and the events, and the canary that "
            "promotes or rolls back a new prompt version ([canary.md](canary.md)).",
    "kafka": "How every Kafka client connects: TLS, client certificates and SASL, as managed "
             "Kafka services require ([operations.md](operations.md#secured-kafka)).",
}

HEADER = f"""# Configuration

<!-- Generated from services/config.py by `{COMMAND}` (make docs). Do not edit. -->

Every setting has one flat name, used three ways; later ones win:

1. the default below;
2. an environment variable `{ENV_PREFIX}<NAME>`;
3. a command-line flag `--<name>` (`-` for `_`; booleans also take `--no-<name>`).

`validate()` checks each setting's rule at start-up. A bad value stops start-up with an
error that names the setting and its variable. Rules that tie two settings together live
in the section's `check()`, for example:

```
{{example}}
```

`promptrec <command> --help` lists the same settings as flags.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(f: dataclasses.Field) -> str:
    rule = Rule.named(f.metadata["rule"]).shown if f.metadata["rule"] else ""
    kind = getattr(f.type, "__name__", f.type)  # a str under `from __future__ import annotations`
    cells = (f"`{f.name}`", f"`{flag_name(f.name)}`", f"`{env_name(f.name)}`",
             f"`{kind}`", f"`{f.default!r}`", rule, f.metadata["help"].replace("<", "&lt;"))
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _example_error() -> str:
    """The error a cross-setting rule raises, from the code itself."""
    try:
        Settings().replace(num_consumers=Settings().streaming.partitions + 5)
    except ConfigError as err:
        return str(err)
    raise AssertionError("num_consumers > partitions was accepted")


def render() -> str:
    """The whole of docs/configuration.md."""
    parts = [HEADER.replace("{example}", _example_error())]
    for section, fields in itertools.groupby(setting_fields(), key=lambda pair: pair[0]):
        kind = type(getattr(Settings(), section)).__name__
        parts.append(f"\n## `{section}` ({kind})\n\n{INTROS[section]}\n\n"
                     "| setting | flag | environment | type | default | rule | meaning |\n"
                     "|---|---|---|---|---|---|---|\n")
        parts.append("\n".join(_row(f) for _, f in fields) + "\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
