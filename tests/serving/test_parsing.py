import pytest

from serving.api import ApiError
from serving.query import (
    parse_explain,
    parse_k,
    parse_recommend_query,
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
