"""Request parsing fuzzed (hypothesis): any query string and any body is either parsed or
refused with a 4xx ApiError and a reason; nothing else escapes (which Serve would answer
with a 500). The same inputs go through real HTTP in tests/serving/test_fuzz_http.py."""

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from services.experiments import BadExperiment, parse_arms
from serving.api import ApiError
from serving.query import (
    RECOMMEND_PARAMS,
    SIMILAR_PARAMS,
    parse_recommend_query,
    parse_similar_query,
    read_experiment_arms,
    read_rollback_version,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.sampled_from([*RECOMMEND_PARAMS, *SIMILAR_PARAMS]) | st.text(max_size=8)
values = st.text(max_size=30) | st.sampled_from(["1", "0", "-1", "1_0", "10.5", "٣", "true",
                                                  "1001", " 5", "a,b,,c", "x" * 300])
params = st.lists(st.tuples(names, values), max_size=6)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)
arm = st.fixed_dictionaries({"name": st.text(max_size=6) | st.sampled_from(["a", "b"]),
                             "version": st.integers(0, 4) | st.just("popularity") | scalars,
                             "share": st.floats(-1, 2) | st.just(0.5) | scalars})
bodies = st.binary(max_size=200) \
    | json_values.map(lambda v: json.dumps(v).encode()) \
    | st.lists(arm, max_size=4).map(lambda arms: json.dumps({"arms": arms}).encode()) \
    | st.integers(1, 3000).map(lambda depth: b"[" * depth) \
    | st.fixed_dictionaries({"version": scalars}).map(lambda v: json.dumps(v).encode())


def refused_or_parsed(call):
    try:
        return call()
    except ApiError as err:
        assert 400 <= err.status < 500 and err.error
        return err


@FUZZ
@given(params)
def test_any_query_string_is_parsed_or_refused_with_a_4xx(pairs):
    refused_or_parsed(lambda: parse_recommend_query(pairs))
    refused_or_parsed(lambda: parse_similar_query(pairs))


def request_with(body: bytes) -> Request:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    return Request({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)


@FUZZ
@given(bodies)
def test_any_admin_body_is_parsed_or_refused_with_a_4xx(body):
    refused_or_parsed(lambda: asyncio.run(read_rollback_version(request_with(body))))
    arms = refused_or_parsed(lambda: asyncio.run(read_experiment_arms(request_with(body))))
    if not isinstance(arms, ApiError):
        try:
            parse_arms(arms, kept={1, 2})
        except BadExperiment as err:
            assert str(err)
