import pytest

from serving.api import ApiError
from serving.query import (
    parse_explain,
    parse_k,
    parse_list,
    parse_recommend_query,
    parse_similar_query,
    parse_user_id,
)


@pytest.mark.parametrize("raw", [None, "", "x" * 129, "bad\nid", "tab\tid", "nul\x00"])
def test_bad_user_ids(raw):
    with pytest.raises(ApiError) as err:
        parse_user_id(raw)
    assert err.value.status == 400


@pytest.mark.parametrize("raw", ["0", "1001", "-3", "ten", "1.5", " 5", "1_0", "+5", "٣",
                                 "00000000001"])
def test_bad_k(raw):
    with pytest.raises(ApiError) as err:
        parse_k(raw)
    assert err.value.status == 400


@pytest.mark.parametrize("raw", ["yes", "2", "TRUE!", "on"])
def test_bad_explain(raw):
    with pytest.raises(ApiError):
        parse_explain(raw)


def test_good_input():
    assert parse_user_id("user-42") == "user-42"
    assert parse_user_id("x" * 128) == "x" * 128
    assert parse_k(None) == 10 and parse_k("1000") == 1000 and parse_k("007") == 7
    assert parse_explain(None) is False and parse_explain("true") is True
    assert parse_explain("0") is False and parse_explain("True") is True


def test_query_refuses_unknown_and_repeated_parameters():
    query = parse_recommend_query([("user_id", "7"), ("k", "3"), ("explain", "1")])
    assert (query.user_id, query.k, query.explain) == ("7", 3, True)
    with pytest.raises(ApiError, match="unknown parameter 'kk'"):
        parse_recommend_query([("user_id", "7"), ("kk", "3")])
    with pytest.raises(ApiError, match="more than once"):
        parse_recommend_query([("user_id", "7"), ("k", "3"), ("k", "4")])


def test_exclude_and_category_take_comma_separated_values():
    query = parse_recommend_query([("user_id", "7"), ("exclude", "a,b,a"),
                                   ("category", "Comedy,War")])
    assert query.exclude == ("a", "b") and query.categories == ("Comedy", "War")
    assert parse_recommend_query([("user_id", "7"), ("exclude", "")]).exclude == ()
    assert parse_list("exclude", None) == ()


@pytest.mark.parametrize("raw", ["a,,b", "a,", ",", "x" * 129, "bad\nid",
                                 ",".join(["i"] * 1001)])
def test_bad_lists_are_refused(raw):
    for name in ("exclude", "category"):
        with pytest.raises(ApiError) as err:
            parse_recommend_query([("user_id", "7"), (name, raw)])
        assert err.value.status == 400 and name in err.value.error


def test_similar_query():
    assert parse_similar_query([("item_id", "sku-1"), ("k", "3")]).k == 3
    for params in ([], [("item_id", "")], [("item_id", "x" * 129)],
                   [("item_id", "a"), ("user_id", "7")], [("item_id", "a"), ("k", "0")]):
        with pytest.raises(ApiError) as err:
            parse_similar_query(params)
        assert err.value.status == 400
