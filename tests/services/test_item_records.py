"""The `promptrec.items` codec: round trips, every reason code, truncation, deletes, and
no input that escapes as anything but `InvalidItemRecord`."""

import json
import random

import pytest

from services.data import Item
from services.events import MAX_ID_CHARS
from services.item_records import (
    ITEM_RECORD_REASONS,
    MAX_ITEM_RECORD_BYTES,
    InvalidItemRecord,
    ItemDelete,
    ItemUpsert,
    decode_item_record,
    encode_item,
)

FULL = Item(item_id="sku-1", title="Trail shoe", text="A light trail shoe.",
            description="Light, for wet rock.", categories=("shoes", "outdoor"),
            attributes={"brand": "Acme", "colour": "grün"}, available=False)


def _value(**fields) -> bytes:
    body = {"item_id": "sku-1", "title": "Trail shoe"}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize("item", [FULL, Item(item_id="a", title="A")])
def test_an_item_round_trips(item):
    value = encode_item(item)
    assert decode_item_record(item.item_id.encode(), value) == ItemUpsert(item, truncated=False)
    assert decode_item_record(None, value).item == item  # an upsert may come without a key


def test_encode_is_compact_and_leaves_defaults_out():
    assert encode_item(Item(item_id="a", title="A")) == b'{"item_id":"a","title":"A"}'
    assert json.loads(encode_item(FULL))["available"] is False
    with pytest.raises(ValueError, match="bytes"):
        encode_item(Item(item_id="a", title="A", text="x" * MAX_ITEM_RECORD_BYTES))


def test_json_null_fields_count_as_absent_and_text_is_trimmed():
    upsert = decode_item_record(b"sku-1", _value(title=" Shoe ", text=None, categories=None,
                                                 attributes=None, available=None,
                                                 description=None))
    assert upsert.item == Item(item_id="sku-1", title="Shoe")


def test_long_text_and_description_are_cut_not_refused():
    upsert = decode_item_record(b"sku-1", _value(text="é" * 50 + "tail", description="d" * 10),
                                max_text_chars=50)
    assert upsert.truncated and upsert.item.text == "é" * 50
    assert upsert.item.description == "d" * 10
    upsert = decode_item_record(b"sku-1", _value(description="d" * 51), max_text_chars=50)
    assert upsert.truncated and upsert.item.description == "d" * 50
    assert not decode_item_record(b"sku-1", _value(text="t" * 50), max_text_chars=50).truncated


def test_a_null_value_deletes_the_item_of_the_key():
    assert decode_item_record(b"sku-1", None) == ItemDelete("sku-1")
    assert decode_item_record("grün-7".encode(), None) == ItemDelete("grün-7")


# (key, value, reason): every reason, and each class of bad input.
BAD = [
    (b"sku-1", b'{"pad":"' + b"x" * MAX_ITEM_RECORD_BYTES + b'"}', "too_large"),
    (b"sku-1", b"\xff\xfe{}", "not_utf8"),
    (b"\xff", _value(), "not_utf8"),  # the key
    (b"\xff", None, "not_utf8"),
    (b"sku-1", _value(title="\ud800"), "not_utf8"),  # a lone surrogate escape
    (b"sku-1", b"", "not_json"),
    (b"sku-1", b"{not json", "not_json"),
    (b"sku-1", b"[" * 100_000 + b"]" * 100_000, "not_json"),
    (b"sku-1", b'{"item_id":"a","title":"A","x":' + b"9" * 5000 + b"}", "not_json"),
    (b"sku-1", b"null", "not_object"),  # the JSON literal: not a delete
    (b"sku-1", b"[1, 2]", "not_object"),
    (b"sku-1", b"42", "not_object"),
    (b"sku-1", b'"sku-1"', "not_object"),
    (None, None, "missing_key"),
    (b"", None, "missing_key"),
    (None, _value(item_id=...), "missing_id"),
    (None, _value(item_id=None), "missing_id"),
    (b"sku-2", _value(), "key_mismatch"),
    (b"x" * (MAX_ID_CHARS + 1), None, "bad_id"),
    (b" sku-1", None, "bad_id"),
    (b"sku\n1", None, "bad_id"),
    (None, _value(item_id=""), "bad_id"),
    (None, _value(item_id="   "), "bad_id"),
    (None, _value(item_id="x" * (MAX_ID_CHARS + 1)), "bad_id"),
    (None, _value(item_id=" sku-1"), "bad_id"),
    (None, _value(item_id="sku\t1"), "bad_id"),
    (b"sku-1", _value(title=...), "empty_title"),
    (b"sku-1", _value(title=None), "empty_title"),
    (b"sku-1", _value(title="  "), "empty_title"),
    (None, _value(item_id=7), "wrong_type"),  # no integer ids on Kafka
    (b"sku-1", _value(title=5), "wrong_type"),
    (b"sku-1", _value(title=True), "wrong_type"),
    (b"sku-1", _value(text=["a"]), "wrong_type"),
    (b"sku-1", _value(description={"a": "b"}), "wrong_type"),
    (b"sku-1", _value(categories="shoes|outdoor"), "wrong_type"),  # a CSV leniency only
    (b"sku-1", _value(categories=["shoes", 1]), "wrong_type"),
    (b"sku-1", _value(categories=[None]), "wrong_type"),
    (b"sku-1", _value(attributes='{"brand": "Acme"}'), "wrong_type"),
    (b"sku-1", _value(attributes=[["brand", "Acme"]]), "wrong_type"),
    (b"sku-1", _value(attributes={"size": 42}), "wrong_type"),
    (b"sku-1", _value(attributes={"size": {"eu": "42"}}), "wrong_type"),
    (b"sku-1", _value(attributes={"size": None}), "wrong_type"),
    (b"sku-1", _value(available="yes"), "wrong_type"),
    (b"sku-1", _value(available=1), "wrong_type"),
    (b"sku-1", b'{"item_id":"sku-1","title":NaN}', "wrong_type"),
    (b"sku-1", b'{"item_id":"sku-1","title":"T","available":Infinity}', "wrong_type"),
    (b"sku-1", _value(colour="red"), "unknown_field"),
]


@pytest.mark.parametrize("key, value, reason", BAD, ids=[f"{b[2]}-{i}" for i, b in
                                                          enumerate(BAD)])
def test_bad_input_is_rejected_with_its_reason(key, value, reason):
    with pytest.raises(InvalidItemRecord) as err:
        decode_item_record(key, value)
    assert err.value.reason == reason
    assert len(err.value.detail) <= 200


def test_every_reason_is_reached():
    assert {b[2] for b in BAD} == set(ITEM_RECORD_REASONS)


def test_details_name_the_field_and_cut_user_text():
    with pytest.raises(InvalidItemRecord) as err:
        decode_item_record(b"sku-1", _value(available="yes"))
    assert err.value.detail.startswith("available:")
    with pytest.raises(InvalidItemRecord) as err:
        decode_item_record(b"sku-1", _value(**{"z" * 500: 1, "colour": 2, "a": 3, "b": 4}))
    assert err.value.detail.startswith("a,b,colour,") and len(err.value.detail) < 60
    with pytest.raises(InvalidItemRecord) as err:
        decode_item_record(b"k" * 100, _value(item_id="i" * 100))
    assert len(err.value.detail) < 120


def test_random_bytes_decode_or_raise_invalid_item_record():
    rng = random.Random(7)
    good = encode_item(FULL)
    pieces = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"null", b"true", b"1e999", b"NaN",
              b'"item_id"', b'"title"', b'"categories"', b'"attributes"', b'"available"',
              b'"\\ud800"', b"\\", b"\xc3", b"\xff", b" ", b'"x"']
    for _ in range(3000):
        shape = rng.random()
        if shape < 0.3:
            value = rng.randbytes(rng.randrange(0, 64))
        elif shape < 0.7:
            value = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 16)))
        else:  # a valid record with a few bytes flipped, cut or inserted
            data = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(len(data) + 1)
                op = rng.random()
                if op < 0.4 and at < len(data):
                    data[at] = rng.randrange(256)
                elif op < 0.7:
                    del data[at:]
                else:
                    data[at:at] = rng.choice(pieces)
            value = bytes(data)
        key = rng.choice([None, b"", b"sku-1", rng.randbytes(4)])
        try:
            result = decode_item_record(key, value if rng.random() < 0.95 else None)
        except InvalidItemRecord as err:
            assert err.reason in ITEM_RECORD_REASONS
        else:
            assert isinstance(result, ItemUpsert | ItemDelete)
