"""The generic catalog and event files: every format, every rule, errors that name the
file, the row and the column, and MovieLens through the same path."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.config import ConfigError, InfraSettings
from services.config_sources import load_settings
from services.data import load_interactions, load_items
from services.item_files import DataFileError, read_table
from services.launch.cli import main
from services.movielens import import_movielens
from services.user_records import load_profiles


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ITEMS = [
    {"item_id": "sku-1", "title": "Trail shoe", "description": "Light, for wet rock.",
     "categories": ["shoes", "outdoor"], "attributes": {"brand": "Acme"}},
    {"item_id": "sku-2", "title": "Rain jacket", "categories": ["outdoor"],
     "attributes": {"colour": "red"}, "available": False},
    {"item_id": "sku-3", "title": "Socks", "text": "Wool socks, three pairs."},
]


def test_items_from_jsonl_csv_and_parquet_are_the_same(tmp_path):
    jsonl_path = _write_jsonl(tmp_path / "items.jsonl", ITEMS)
    jsonl = load_items(jsonl_path)
    csv = tmp_path / "items.csv"
    csv.write_text('item_id,title,description,categories,attributes,available,text\n'
                   'sku-1,Trail shoe,"Light, for wet rock.",shoes|outdoor,"{""brand"": '
                   '""Acme""}",,\n'
                   'sku-2,Rain jacket,,outdoor,"{""colour"": ""red""}",false,\n'
                   'sku-3,Socks,,,,,"Wool socks, three pairs."\n')
    from_csv = load_items(str(csv))
    pq.write_table(read_table(jsonl_path), tmp_path / "items.parquet")
    from_parquet = load_items(str(tmp_path / "items.parquet"))
    for items in (jsonl, from_csv, from_parquet):
        assert [i.item_id for i in items] == ["sku-1", "sku-2", "sku-3"]
        assert items[0].categories == ("shoes", "outdoor")
        assert items[0].attributes == {"brand": "Acme"}
        assert items[1].attributes == {"colour": "red"}  # no None for sku-1's brand
        assert [i.available for i in items] == [True, False, True]
        assert items[0].document == "Trail shoe. Light, for wet rock. Categories: shoes, outdoor."
        assert items[2].document == "Wool socks, three pairs."  # `text` wins


def test_a_csv_id_keeps_its_leading_zeros(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\n007,Bond\n")
    assert load_items(str(path))[0].item_id == "007"


@pytest.mark.parametrize("rows, row, column", [
    ([{"item_id": "a", "title": "A", "colour": "red"}], None, "colour"),  # unknown column
    ([{"item_id": "a", "title": "A"}, {"item_id": "b", "title": "  "}], 1, "title"),
    ([{"item_id": "a", "title": "A"}, {"item_id": "a", "title": "B"}], 1, "item_id"),
    ([{"item_id": "", "title": "A"}], 0, "item_id"),
    ([{"item_id": "x" * 129, "title": "A"}], 0, "item_id"),
    ([{"item_id": "a", "title": "A", "available": "maybe"}], 0, "available"),
    ([{"item_id": "a", "title": "A", "categories": {"shoes": "yes"}}], 0, "categories"),
    ([{"item_id": "a", "title": "A", "attributes": ["red"]}], 0, "attributes"),
    ([{"item_id": "a", "title": "A", "attributes": {"size": 42}}], 0, "attributes"),
    ([{"item_id": "a", "title": 5}], 0, "title"),
    ([{"title": "A"}], None, "item_id"),  # required column missing
])
def test_a_bad_item_file_names_the_row_and_the_column(tmp_path, rows, row, column):
    path = _write_jsonl(tmp_path / "items.jsonl", rows)
    with pytest.raises(DataFileError) as err:
        load_items(path)
    assert (err.value.row, err.value.column) == (row, column)
    assert str(err.value).startswith(path)


def test_unreadable_files_are_refused_with_their_name(tmp_path):
    with pytest.raises(DataFileError, match="unknown format"):
        read_table(str(tmp_path / "items.xlsx"))
    with pytest.raises(DataFileError, match="cannot read it as parquet"):
        read_table(str(tmp_path / "missing.parquet"))
    (tmp_path / "broken.jsonl").write_text('{"item_id": "a", "title": \n')
    with pytest.raises(DataFileError, match="broken.jsonl"):
        load_items(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFileError):
        load_items(str(tmp_path / "empty.jsonl"))


def test_events_are_sorted_typed_and_named(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("user_id,item_id,ts,type,value\n"
                    "7,sku-2,200,view,\n"
                    "7,sku-1,100,,\n"
                    "8,sku-1,150,purchase,19.5\n")
    events = load_interactions(str(path))
    assert [e.item_id for e in map(events.event, range(3))] == ["sku-1", "sku-1", "sku-2"]
    first, second, third = (events.event(i) for i in range(3))
    assert (first.user_id, first.type, first.value, first.event_id) == ("7", "click", None,
                                                                        "clicks-1")
    assert (second.type, second.value) == ("purchase", 19.5)
    assert third.type == "view"
    assert len(load_interactions(str(path), limit=2)) == 2


def test_event_timestamps_may_be_a_timestamp_column(tmp_path):
    table = pa.table({"user_id": [1, 2], "item_id": ["a", "b"],
                      "ts": pa.array([1_000_000_000, 1_000_000_001], pa.timestamp("s"))})
    pq.write_table(table, tmp_path / "events.parquet")
    events = load_interactions(str(tmp_path / "events.parquet"))
    assert events.ts.tolist() == [1e9, 1e9 + 1] and events.user_ids.tolist() == ["1", "2"]


@pytest.mark.parametrize("body, row, column", [
    ("user_id,item_id,ts\nu,a,1\nu,b,soon\n", 1, "ts"),
    ("user_id,item_id,ts\nu,a,1\nu,b,-5\n", 1, "ts"),
    ("user_id,item_id,ts\nu,a,1\n,b,2\n", 1, "user_id"),
    ("user_id,item_id,ts,type\nu,a,1,click\nu,b,2,like\n", 1, "type"),
    ("user_id,item_id,ts,value\nu,a,1,high\n", 0, "value"),
    ("user_id,item_id\nu,a\n", None, "ts"),
    ("user_id,item_id,ts,extra\nu,a,1,x\n", None, "extra"),
])
def test_a_bad_event_file_names_the_row_and_the_column(tmp_path, body, row, column):
    path = tmp_path / "events.csv"
    path.write_text(body)
    with pytest.raises(DataFileError) as err:
        load_interactions(str(path))
    assert (err.value.row, err.value.column) == (row, column)


def test_movielens_imports_to_files_that_read_back_the_same(tmp_path):
    items_path, events_path, users_path = import_movielens("ml-100k", tmp_path)
    assert load_items(str(items_path)) == load_items("ml-100k")
    assert load_profiles(str(users_path)) == load_profiles("ml-100k")
    from_file, from_name = load_interactions(str(events_path)), load_interactions("ml-100k")
    for column in ("user_ids", "item_ids", "ts", "types", "event_ids"):
        assert (getattr(from_file, column) == getattr(from_name, column)).all(), column
    assert np.array_equal(from_file.values, from_name.values)


def test_the_import_command_writes_both_files(tmp_path, capsys):
    assert main(["import", "movielens", "ml-100k", "--out", str(tmp_path / "ml")]) == 0
    out = capsys.readouterr().out
    assert "items.parquet" in out and "users.parquet" in out
    assert pq.read_table(tmp_path / "ml" / "events.parquet").num_rows == 100_000
    assert pq.read_table(tmp_path / "ml" / "users.parquet").num_rows == 943


def test_a_missing_catalog_file_fails_at_start_up_naming_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="'catalog'"):
        load_settings(env={}, overrides={"catalog": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ConfigError, match="'events'"):
        load_settings(env={"PROMPTREC_EVENTS": str(tmp_path / "nope.csv")})
    good = _write_jsonl(tmp_path / "items.jsonl", ITEMS)
    assert load_settings(env={}, overrides={"catalog": good}).infra.catalog_source == good
    assert load_settings(env={}, overrides={"catalog": "s3://bucket/items.parquet"})
    assert InfraSettings().catalog_source == "ml-100k"


def test_a_bad_catalog_file_exits_2_naming_file_row_and_column(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "items.jsonl", [{"item_id": "a", "title": ""}])
    code = main(["eval", "offline", "--catalog", path, "--max-users", "1", "--steps", "1",
                 "--data-dir", str(tmp_path / "d")])
    assert code == 2
    assert f"{path}, row 0, column 'title'" in capsys.readouterr().err



def test_promptrec_items_refuses_a_bad_file_or_nothing_to_send_before_any_kafka(tmp_path,
                                                                                capsys):
    # No broker listens on this port: the refusals must come before any connection.
    assert main(["items", "--kafka-bootstrap", "127.0.0.1:9"]) == 2
    assert "give an item file or --delete" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "items.jsonl", [{"item_id": "a", "title": "A"},
                                                  {"item_id": "a", "title": "again"}])
    assert main(["items", bad, "--kafka-bootstrap", "127.0.0.1:9"]) == 2
    assert f"{bad}, row 1, column 'item_id'" in capsys.readouterr().err
    assert main(["items", bad]) == 2  # no bootstrap at all
    assert "set --kafka-bootstrap" in capsys.readouterr().err
