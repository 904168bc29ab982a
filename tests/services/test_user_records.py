"""The `promptrec.users` codec and the profile files: round trips, every reason code over
classes of input (hypothesis), truncation, deletes; files that fail naming file, row and
column; the MovieLens profiles."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events import MAX_ID_CHARS
from services.item_fields import UserProfile
from services.item_files import DataFileError
from services.movielens import event_table, profile_text, user_table
from services.user_records import (
    MAX_USER_RECORD_BYTES,
    USER_RECORD_REASONS,
    InvalidUserRecord,
    ProfileDelete,
    ProfileUpsert,
    decode_user_record,
    encode_profile,
    load_profiles,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FULL = UserProfile("u-1", "A hiker who likes wet rock.", {"age": "25-34", "city": "Zürich"})
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
good_ids = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Cf",
                                                       "Co", "Cn")), min_size=1, max_size=20)
good_texts = st.text(min_size=1, max_size=60).filter(str.strip)


def _value(**fields) -> bytes:
    body = {"user_id": "u-1", "text": "A hiker."}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def reason(key, value) -> str | None:
    try:
        decode_user_record(key, value)
    except InvalidUserRecord as err:
        return err.reason
    return None


@pytest.mark.parametrize("profile", [FULL, UserProfile("7", "x")])
def test_a_profile_round_trips_with_or_without_a_key(profile):
    value = encode_profile(profile)
    assert decode_user_record(profile.user_id.encode(), value) == ProfileUpsert(profile, False)
    assert decode_user_record(None, value).profile == profile


@FUZZ
@given(good_ids, good_texts, st.dictionaries(st.text(max_size=8), st.text(max_size=8)))
def test_every_well_formed_profile_round_trips(user_id, text, attributes):
    profile = UserProfile(user_id, text.strip(), attributes)
    assert decode_user_record(user_id.encode(), encode_profile(profile)).profile == profile


def test_a_null_value_deletes_and_needs_a_good_key():
    assert decode_user_record(b"u-1", None) == ProfileDelete("u-1")
    assert reason(None, None) == "missing_key"
    assert reason(b" u-1", None) == "bad_id"
    assert reason(b"\xff", None) == "not_utf8"


def test_long_text_is_cut_and_counted_not_refused():
    upsert = decode_user_record(b"u-1", _value(text="é" * 30 + "tail"), max_text_chars=30)
    assert upsert.truncated and upsert.profile.text == "é" * 30
    assert not decode_user_record(b"u-1", _value(text="t" * 30), max_text_chars=30).truncated


@FUZZ
@given(st.binary(max_size=200).filter(lambda b: not _is_json(b)))
def test_bytes_that_are_not_json_are_refused(value):
    assert reason(b"u-1", value) in ("not_json", "not_utf8")


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return True


@FUZZ
@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object_is_refused(body):
    assert reason(b"u-1", json.dumps(body).encode()) == "not_object"


@FUZZ
@given(st.sampled_from([None, "", "  ", "\t\n"]), good_texts)
def test_a_missing_or_empty_user_id_is_refused(user_id, text):
    value = _value(user_id=... if user_id is None else user_id, text=text)
    assert reason(None, value) == ("missing_id" if user_id is None else "bad_id")


@FUZZ
@given(st.one_of(good_ids.map(lambda s: " " + s), good_ids.map(lambda s: s + "\n"),
                 st.text(min_size=MAX_ID_CHARS + 1, max_size=MAX_ID_CHARS + 5).filter(
                     str.strip)))
def test_an_id_with_spaces_or_too_long_is_refused(user_id):
    assert reason(None, _value(user_id=user_id)) == "bad_id"


@FUZZ
@given(good_ids, good_ids)
def test_a_key_that_differs_from_user_id_is_refused(key, user_id):
    got = reason(key.encode(), _value(user_id=user_id))
    assert got == (None if key == user_id else "key_mismatch")


@FUZZ
@given(st.sampled_from(["user_id", "text", "attributes"]), json_values)
def test_wrong_types_are_refused(name, wrong):
    fits = {"user_id": lambda v: isinstance(v, str), "text": lambda v: isinstance(v, str),
            "attributes": lambda v: isinstance(v, dict)
            and all(isinstance(x, str) for x in v.values())}[name]
    if wrong is None or fits(wrong):
        return
    assert reason(None, _value(**{name: wrong})) == "wrong_type"


@FUZZ
@given(st.dictionaries(st.text(max_size=10).filter(
    lambda n: n not in ("user_id", "text", "attributes")), json_values, min_size=1, max_size=3))
def test_unknown_fields_are_refused(extra):
    assert reason(b"u-1", _value(**extra)) == "unknown_field"


@FUZZ
@given(st.sampled_from(["", " ", "\n\t"]) | st.none())
def test_a_missing_or_empty_text_is_refused(text):
    assert reason(b"u-1", _value(text=... if text is None else text)) == "empty_text"


def test_oversized_values_are_refused_before_they_are_parsed():
    assert reason(b"u-1", b"{" + b" " * MAX_USER_RECORD_BYTES + b"}") == "too_large"
    with pytest.raises(ValueError, match="bytes"):
        encode_profile(UserProfile("u", "x" * MAX_USER_RECORD_BYTES))
    assert reason(b"u-1", b'{"user_id": "u-1", "text": "\\ud800"}') == "not_utf8"


@FUZZ
@given(st.none() | st.binary(max_size=20), st.none() | st.binary(max_size=300)
       | st.fixed_dictionaries({}, optional={f: json_values for f in
                                             ("user_id", "text", "attributes")}).map(
           lambda body: json.dumps(body).encode()))
def test_any_record_is_accepted_or_refused_with_a_known_reason(key, value):
    got = reason(key, value)
    assert got is None or got in USER_RECORD_REASONS


# --- files ----------------------------------------------------------------------------
ROWS = [{"user_id": "u-1", "text": "A hiker.", "attributes": {"age": "30"}},
        {"user_id": "u-2", "text": "A reader of old maps."}]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_profile_file_reads_in_every_format(tmp_path):
    expected = [UserProfile("u-1", "A hiker.", {"age": "30"}),
                UserProfile("u-2", "A reader of old maps.")]
    assert load_profiles(_jsonl(tmp_path / "u.jsonl", ROWS)) == expected
    (tmp_path / "u.csv").write_text('user_id,text,attributes\nu-1,A hiker.,"{""age"": ""30""}"'
                                    '\nu-2,A reader of old maps.,\n')
    assert load_profiles(str(tmp_path / "u.csv")) == expected
    pq.write_table(pa.table({"user_id": ["u-1", "u-2"], "text": ["A hiker.",
                                                                 "A reader of old maps."],
                             "attributes": pa.array([[("age", "30")], []],
                                                    pa.map_(pa.string(), pa.string()))}),
                   tmp_path / "u.parquet")
    assert load_profiles(str(tmp_path / "u.parquet")) == expected


@pytest.mark.parametrize("rows, row, column", [
    ([ROWS[0], {"user_id": "u-2", "text": " "}], 1, "text"),
    ([ROWS[0], {"user_id": "", "text": "x"}], 1, "user_id"),
    ([ROWS[0], {"user_id": "u-1", "text": "again"}], 1, "user_id"),
    ([ROWS[0], {"user_id": "u-3", "text": "x", "attributes": {"a": 1}}], 1, "attributes"),
    ([{"user_id": "u-1", "text": "x", "age": 3}], None, "age"),
    ([{"user_id": "u-1"}], None, "text"),
])
def test_a_bad_profile_file_names_file_row_and_column(tmp_path, rows, row, column):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFileError) as caught:
        load_profiles(path)
    assert (caught.value.path, caught.value.row, caught.value.column) == (path, row, column)
    assert path in str(caught.value) and repr(column) in str(caught.value)


# --- MovieLens ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ml-100k", "ml-1m"])
def test_movielens_profiles_name_the_users_of_the_events(name):
    table = user_table(name)
    assert table.schema.field("attributes").type == pa.map_(pa.string(), pa.string())
    assert set(table["user_id"].to_pylist()) == set(event_table(name)["user_id"].to_pylist())
    profiles = load_profiles(name)  # every row valid
    assert all(p.text.endswith(".") and set(p.attributes) <= {"age", "gender", "occupation",
                                                              "zip_code"} for p in profiles)


def test_movielens_profile_text_reads_as_a_sentence():
    assert profile_text("25-34", "M", "programmer", "55117") == \
        "A man aged 25-34, a programmer, from the US Upper Midwest (zip 55117)."
    assert profile_text("under 18", "F", "other", "02139") == \
        "A woman under 18, from New England (zip 02139)."
    assert profile_text("45-49", "F", "executive/managerial", "T8H1N") == \
        "A woman aged 45-49, an executive or manager, zip code T8H1N."
    first = user_table("ml-1m").slice(0, 1).to_pylist()[0]
    assert first["user_id"] == "1m_1" and dict(first["attributes"])["occupation"] == \
        "K-12 student" and first["text"].startswith("A woman under 18, a K-12 student")
