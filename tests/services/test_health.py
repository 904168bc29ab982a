"""The one poll loop (services/health.py): returns the first truthy check, names what
it waited for on timeout. No real clock waits: a deadline of 0 means one check."""

import httpx
import pytest

from services import health


def test_returns_the_first_truthy_value():
    values = iter([None, 0, {}, {"handled": 5}])
    assert health.wait_until(lambda: next(values), 5, "ready", interval_s=0) == {"handled": 5}


def test_timeout_names_what_was_awaited_and_the_last_look():
    with pytest.raises(TimeoutError, match=r"replicas on v3: not so after 0 s .*'v2'") as err:
        health.wait_until(lambda: _Falsy("v2"), 0, lambda: "replicas on v3", interval_s=0)
    assert isinstance(err.value, health.WaitTimeout) and err.value.last == "v2"


class _Falsy(str):
    """A check result that is not yet good enough but says what it saw."""

    def __bool__(self):
        return False


def test_the_check_runs_once_even_with_the_deadline_past():
    calls = []
    with pytest.raises(health.WaitTimeout):
        health.wait_until(lambda: calls.append(1), 0, "never", interval_s=0)
    assert calls == [1]


def test_answers_is_the_200_response_or_none():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/down":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200 if request.url.path == "/healthz" else 503)

    with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://x") as client:
        assert health.answers("/healthz", client).status_code == 200
        assert health.answers("/busy", client) is None  # 503: starting or overloaded
        assert health.answers("/down", client) is None
