"""The item-record contract of the Kafka topic `promptrec.items`: codec and validation.

A record is key = item_id (UTF-8) and a JSON object value in the item format of the
catalog files (`services.item_fields` holds the field rules, shared with them):
`item_id` (str, required, 1..MAX_ID_CHARS printable characters, no surrounding spaces),
`title` (str, required, not empty), optional `text`, `description` (str), `categories`
(list of str), `attributes` (str -> str object), `available` (bool, default true).
A field that is JSON null counts as absent. The real JSON types are required: none of
the files' CSV leniencies ("a|b" categories, "yes" for true, an integer id).

A record whose value is null (a Kafka tombstone) deletes the item its key names; the
JSON literal `null` is not a delete but `not_object`. An upsert may come without a key;
a key it has must equal its item_id.

`text` and `description` longer than `max_text_chars` are cut to it, not refused: the
backbone reads a few hundred tokens anyway; the result says `truncated`.

The rules of a keyed JSON record (key, tombstone, size, UTF-8, JSON object, unknown fields,
key = id) are `decode_keyed`'s, shared with the user-profile topic (`services.user_records`).

`decode_item_record` returns an `ItemUpsert` or an `ItemDelete`, or raises
`InvalidItemRecord` whose `reason` (one of ITEM_RECORD_REASONS) goes in the `reason`
header of the dead-letter topic `promptrec.items.dlq` and in the metric label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from services.data import Item
from services.item_fields import ITEM_FIELDS, ItemFieldError, id_from, item_from_record

MAX_ITEM_RECORD_BYTES = 1 << 20
MAX_ITEM_TEXT_CHARS = 4000
_SHORT = 40  # user-provided text in a detail is cut to this

ITEM_RECORD_REASONS = (
    "too_large", "not_utf8", "not_json", "not_object", "missing_key", "missing_id",
    "key_mismatch", "bad_id", "empty_title", "wrong_type", "unknown_field",
)
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number",
               float: "number", bool: "boolean", type(None): "null"}


class InvalidRecord(ValueError):
    """A keyed JSON record refused; `reason` (one of the subclass's REASONS) goes in the
    dead-letter header and the metric label. The item and the user-profile codecs share
    the rules of a keyed JSON object below, so both refuse the same bytes the same way."""

    REASONS: tuple[str, ...] = ()

    def __init__(self, reason: str, detail: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidItemRecord(InvalidRecord):
    REASONS = ITEM_RECORD_REASONS


def record_key(key: bytes | None, error: type[InvalidRecord]) -> str | None:
    """The key as text (None: no key); not UTF-8 is refused."""
    try:
        return key.decode("utf-8") if key else None
    except UnicodeDecodeError:
        raise error("not_utf8", "key is not UTF-8") from None


def json_object(value: bytes, known: tuple[str, ...], error: type[InvalidRecord],
                max_bytes: int = MAX_ITEM_RECORD_BYTES) -> dict:
    """The value as a JSON object with only `known` fields, or `error` with a reason:
    too_large, not_utf8, not_json, not_object, unknown_field."""
    if len(value) > max_bytes:
        raise error("too_large", f"{len(value)} bytes > {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error("not_utf8", str(err)[:200]) from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as err:
        # RecursionError: deep nesting; ValueError: also an integer past Python's digit limit.
        raise error("not_json", str(err)[:200]) from None
    if not isinstance(body, dict):
        raise error("not_object", f"got {_JSON_TYPES.get(type(body), 'other')}")
    if "\\u" in text:  # an escaped lone surrogate: text no UTF-8 encoder can write back
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise error("not_utf8", "a \\u escape is a lone surrogate") from None
    extra = sorted(name for name in body if name not in known)
    if extra:
        shown = ",".join(name[:_SHORT] for name in extra[:3])
        raise error("unknown_field", shown + (",…" if len(extra) > 3 else ""))
    return body


def deleted_id(key_text: str | None, column: str, error: type[InvalidRecord]) -> str:
    """The id a delete (a null value) names: its key, which it must have."""
    if key_text is None:
        raise error("missing_key", f"a delete (null value) needs the {column} key")
    try:
        return id_from(column, key_text, lenient_csv=False)
    except ItemFieldError as err:
        raise error("bad_id", f"key: {err.problem}") from None


def decode_keyed(key: bytes | None, value: bytes | None, fields: tuple[str, ...], build,
                 other_required: str, error: type[InvalidRecord],
                 max_bytes: int = MAX_ITEM_RECORD_BYTES) -> tuple[str, object]:
    """A keyed record -> (the id a delete names, None) or ("", `build(record)`), or `error`
    with a reason. The id is the first of `fields`; a key an upsert has must equal it."""
    key_text = record_key(key, error)
    if value is None:
        return deleted_id(key_text, fields[0], error), None
    body = json_object(value, fields, error, max_bytes)
    try:
        built = build(body, lenient_csv=False)
    except ItemFieldError as err:
        raise error(field_reason(err, fields[0], other_required),
                    f"{err.column}: {err.problem}") from None
    given = getattr(built, fields[0])
    if key_text is not None and key_text != given:
        raise error("key_mismatch", f"key {key_text[:_SHORT]!r} is not {fields[0]} "
                    f"{given[:_SHORT]!r}")
    return "", built


@dataclass(frozen=True)
class ItemUpsert:
    item: Item
    truncated: bool  # text or description was cut to max_text_chars


@dataclass(frozen=True)
class ItemDelete:
    item_id: str


def field_reason(err: ItemFieldError, id_column: str, other_required: str) -> str:
    """The reason of a broken field rule: `other_required` names the one required field
    besides the id (an item's title, a profile's text)."""
    if err.kind == "unknown":
        return "unknown_field"
    if err.kind == "wrong_type":
        return "wrong_type"
    if err.column == id_column:
        return "missing_id" if err.kind == "missing" else "bad_id"
    return other_required


def decode_item_record(key: bytes | None, value: bytes | None,
                       max_text_chars: int = MAX_ITEM_TEXT_CHARS) -> ItemUpsert | ItemDelete:
    """Validate one record of `promptrec.items`; raise `InvalidItemRecord` with a reason."""
    if max_text_chars < 1:
        raise ValueError(f"max_text_chars must be positive, got {max_text_chars}")
    deleted, item = decode_keyed(key, value, ITEM_FIELDS, item_from_record, "empty_title",
                                 InvalidItemRecord)
    if item is None:
        return ItemDelete(deleted)
    truncated = len(item.text) > max_text_chars or len(item.description) > max_text_chars
    if truncated:
        item = replace(item, text=item.text[:max_text_chars],
                       description=item.description[:max_text_chars])
    return ItemUpsert(item=item, truncated=truncated)


def encode_item(item: Item) -> bytes:
    """The compact JSON value of an upsert of `item` (send it with key = item_id UTF-8);
    fields at their default are left out. A delete is a record with a null value.
    Raises ValueError if the value would be over MAX_ITEM_RECORD_BYTES."""
    body: dict[str, object] = {"item_id": item.item_id, "title": item.title}
    for name, given in (("text", item.text), ("description", item.description),
                        ("categories", list(item.categories)),
                        ("attributes", item.attributes)):
        if given:
            body[name] = given
    if not item.available:
        body["available"] = False
    value = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(value) > MAX_ITEM_RECORD_BYTES:
        raise ValueError(f"item {item.item_id[:_SHORT]!r}: {len(value)} bytes > "
                         f"{MAX_ITEM_RECORD_BYTES}")
    return value
