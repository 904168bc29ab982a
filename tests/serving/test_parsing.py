import pytest

from serving.app import ApiError, parse_k, parse_user_id


@pytest.mark.parametrize("raw", [None, "", "x" * 129, "bad\nid", "tab\tid"])
def test_bad_user_ids(raw):
    with pytest.raises(ApiError) as err:
        parse_user_id(raw)
    assert err.value.status == 400


@pytest.mark.parametrize("raw", ["0", "1001", "-3", "ten", "1.5"])
def test_bad_k(raw):
    with pytest.raises(ApiError):
        parse_k(raw)


def test_good_input():
    assert parse_user_id("user-42") == "user-42"
    assert parse_k(None) == 10 and parse_k("1000") == 1000
