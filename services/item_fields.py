"""The item and user-profile field rules, in one place: the catalog and profile files
(`services.item_files`) and the Kafka codecs of `promptrec.items` and `promptrec.users`
(`services.item_records`, `services.user_records`) all build their records here.

`item_from_record` turns one record (a dict of field -> value) into an `Item`, and
`profile_from_record` into a `UserProfile` (user_id, text, attributes), or they raise
`ItemFieldError` naming the field, the problem and its kind. `lenient_csv=True` is the
file path, which also accepts what CSV, Parquet and pyarrow's JSON reader produce: an
integer `item_id`, "a|b" categories, JSON-text or Parquet-map attributes (values None
dropped), "yes"/"1"/"no"/"0" for `available`, ids trimmed of surrounding spaces.
`lenient_csv=False` (JSON records from Kafka) wants the real JSON types and an id as it
is: 1..MAX_ID_CHARS printable characters without surrounding spaces. In both, a field
that is None counts as absent, and text is trimmed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from services.data import Item
from services.events import MAX_ID_CHARS

ITEM_FIELDS = ("item_id", "title", "text", "description", "categories", "attributes",
               "available")
PROFILE_FIELDS = ("user_id", "text", "attributes")
ITEM_FIELD_KINDS = ("missing", "empty", "wrong_type", "too_long", "invalid", "unknown")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class ItemFieldError(ValueError):
    """One field of an item record breaks a rule; `kind` is one of ITEM_FIELD_KINDS."""

    def __init__(self, column: str, problem: str, kind: str):
        assert kind in ITEM_FIELD_KINDS, kind
        super().__init__(f"{column}: {problem}")
        self.column, self.problem, self.kind = column, problem, kind


@dataclass(frozen=True)
class UserProfile:
    """A user's own words: what the backbone may read of them before any click."""

    user_id: str
    text: str
    attributes: dict[str, str] = field(default_factory=dict, hash=False)


def id_from(column: str, value: object, *, lenient_csv: bool) -> str:
    """The id (`item_id`, `user_id`) `value` names, by the rules above."""
    if lenient_csv and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    given = _text(column, value, lenient_csv, required=True)
    if len(given) > MAX_ID_CHARS:
        raise ItemFieldError(column, f"longer than {MAX_ID_CHARS} characters", "too_long")
    if not lenient_csv and (given != value or not given.isprintable()):
        raise ItemFieldError(column, "not printable or has surrounding spaces", "invalid")
    return given


def item_id_from(value: object, *, lenient_csv: bool) -> str:
    return id_from("item_id", value, lenient_csv=lenient_csv)


def _no_unknown(record: dict, known: tuple[str, ...]) -> None:
    extra = sorted(str(name) for name in record if name not in known)
    if extra:
        raise ItemFieldError(extra[0], f"unknown field (known: {', '.join(known)})", "unknown")


def profile_from_record(record: dict, *, lenient_csv: bool) -> UserProfile:
    """The profile of one record (`text` required, not empty; it is not cut here: the
    Kafka codec cuts and counts); raises `ItemFieldError` at the first broken rule."""
    _no_unknown(record, PROFILE_FIELDS)
    get = record.get
    return UserProfile(user_id=id_from("user_id", get("user_id"), lenient_csv=lenient_csv),
                       text=_text("text", get("text"), lenient_csv, required=True),
                       attributes=_attributes(get("attributes"), lenient_csv))


def item_from_record(record: dict, *, lenient_csv: bool) -> Item:
    """The item of one record; raises `ItemFieldError` at the first broken rule."""
    _no_unknown(record, ITEM_FIELDS)
    get = record.get
    return Item(item_id=item_id_from(get("item_id"), lenient_csv=lenient_csv),
                title=_text("title", get("title"), lenient_csv, required=True),
                text=_text("text", get("text"), lenient_csv),
                description=_text("description", get("description"), lenient_csv),
                categories=_categories(get("categories"), lenient_csv),
                attributes=_attributes(get("attributes"), lenient_csv),
                available=_available(get("available"), lenient_csv))


def _text(column: str, value: object, lenient_csv: bool, required: bool = False) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            missing = value is None and not lenient_csv  # a file has the column: "empty"
            raise ItemFieldError(column, "missing" if missing else "empty",
                                 "missing" if value is None else "empty")
        return ""
    if not isinstance(value, str):
        raise ItemFieldError(column, f"expected text, got {type(value).__name__}",
                             "wrong_type")
    return value.strip()


def _categories(value: object, lenient_csv: bool) -> tuple[str, ...]:
    if value is None:
        return ()
    if lenient_csv and isinstance(value, str):  # CSV
        value = value.split("|")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ItemFieldError("categories", "expected a list of text", "wrong_type")
    return tuple(v.strip() for v in value if v.strip())


def _attributes(value: object, lenient_csv: bool) -> dict[str, str]:
    if value is None:
        return {}
    wrong = ItemFieldError("attributes", "expected a map of text to text", "wrong_type")
    if lenient_csv:
        if isinstance(value, str):  # CSV
            try:
                value = json.loads(value) if value.strip() else {}
            except (ValueError, RecursionError) as err:
                raise ItemFieldError("attributes", f"not a JSON object: {err}",
                                     "wrong_type") from err
        if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2
                                           for p in value):
            value = dict(value)  # Parquet map<string, string>: [(key, value), ...]
        if not isinstance(value, dict):
            raise wrong
        # JSON objects are read as structs: keys only other rows have come back as None.
        value = {str(k): v for k, v in value.items() if v is not None}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise wrong
    return dict(value)


def _available(value: object, lenient_csv: bool) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if lenient_csv:
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ItemFieldError("available", f"expected true or false, got {value!r}",
                             "wrong_type")
    raise ItemFieldError("available", f"expected true or false, got {type(value).__name__}",
                         "wrong_type")
