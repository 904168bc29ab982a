"""The user-profile contract of the Kafka topic `promptrec.users`: codec and validation.

A user's own words let the model place a user who has not clicked anything yet. A record
is key = user_id (UTF-8) and a JSON object value:
`user_id` (str, required, 1..MAX_ID_CHARS printable characters, no surrounding spaces),
`text` (str, required, not empty: what the backbone reads), optional `attributes`
(str -> str object: age, occupation, ...). A field that is JSON null counts as absent;
the real JSON types are required (the field rules live in `services.item_fields`, the
keyed-JSON rules in `services.item_records`, shared with the item topic).

A record whose value is null (a Kafka tombstone) deletes the profile of the user its key
names; the JSON literal `null` is not a delete but `not_object`. An upsert may come
without a key; a key it has must equal its user_id.

`text` longer than `max_text_chars` is cut to it, not refused (the result says
`truncated`): a long self-description is still a description.

`decode_user_record` returns a `ProfileUpsert` or a `ProfileDelete`, or raises
`InvalidUserRecord` whose `reason` (one of USER_RECORD_REASONS) goes in the `reason`
header of the dead-letter topic `promptrec.users.dlq` and in the metric label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from services.item_fields import PROFILE_FIELDS, UserProfile, profile_from_record
from services.item_records import InvalidRecord, decode_keyed

MAX_USER_RECORD_BYTES = 64 << 10
MAX_USER_TEXT_CHARS = 1000

USER_RECORD_REASONS = (
    "too_large", "not_utf8", "not_json", "not_object", "missing_key", "missing_id",
    "key_mismatch", "bad_id", "empty_text", "wrong_type", "unknown_field",
)


class InvalidUserRecord(InvalidRecord):
    REASONS = USER_RECORD_REASONS


@dataclass(frozen=True)
class ProfileUpsert:
    profile: UserProfile
    truncated: bool  # text was cut to max_text_chars


@dataclass(frozen=True)
class ProfileDelete:
    user_id: str


def decode_user_record(key: bytes | None, value: bytes | None,
                       max_text_chars: int = MAX_USER_TEXT_CHARS
                       ) -> ProfileUpsert | ProfileDelete:
    """Validate one record of `promptrec.users`; raise `InvalidUserRecord` with a reason."""
    if max_text_chars < 1:
        raise ValueError(f"max_text_chars must be positive, got {max_text_chars}")
    deleted, profile = decode_keyed(key, value, PROFILE_FIELDS, profile_from_record,
                                    "empty_text", InvalidUserRecord, MAX_USER_RECORD_BYTES)
    if profile is None:
        return ProfileDelete(deleted)
    truncated = len(profile.text) > max_text_chars
    if truncated:
        profile = replace(profile, text=profile.text[:max_text_chars])
    return ProfileUpsert(profile=profile, truncated=truncated)


def encode_profile(profile: UserProfile) -> bytes:
    """The compact JSON value of an upsert of `profile` (send it with key = user_id UTF-8);
    empty attributes are left out. A delete is a record with a null value.
    Raises ValueError if the value would be over MAX_USER_RECORD_BYTES."""
    body: dict[str, object] = {"user_id": profile.user_id, "text": profile.text}
    if profile.attributes:
        body["attributes"] = profile.attributes
    value = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(value) > MAX_USER_RECORD_BYTES:
        raise ValueError(f"profile {profile.user_id[:40]!r}: {len(value)} bytes > "
                         f"{MAX_USER_RECORD_BYTES}")
    return value


def load_profiles(source: str) -> list[UserProfile]:
    """The profiles of a MovieLens name (`services.movielens.user_table`) or of a profile
    file (path or URI), validated whole: a bad file raises `DataFileError` naming the
    file, the row and the column."""
    from services.data import is_movielens
    from services.item_files import profiles_from_table, read_table
    from services.movielens import user_table

    table = user_table(source) if is_movielens(source) else read_table(source)
    return profiles_from_table(table, source)
