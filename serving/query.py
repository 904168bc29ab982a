"""Request parsing: query strings and bodies in, typed values out, or a 400 `ApiError`.

Strict on purpose: a typo (`kk=5`), a repeated parameter, Python-only integer syntax
(`1_0`) or a non-printable user id is refused with a reason, never silently defaulted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Request

from services.events import MAX_ID_CHARS
from serving.api import ApiError

MAX_K = 1000
MAX_LIST_VALUES = 1000  # ids in `exclude`, names in `category`
RECOMMEND_PARAMS = ("user_id", "k", "explain", "exclude", "category", "query")
SIMILAR_PARAMS = ("item_id", "k")
_K_PATTERN = re.compile(r"[0-9]{1,4}")  # ASCII digits only: int() also takes "1_0", " 5", "٣"
_TRUE, _FALSE = ("true", "1"), ("false", "0")
_ROLLBACK_BODY = '{"version": <int>}'
_EXPERIMENT_BODY = ('{"arms": [{"name": "a", "version": <int>, "share": 0.5}, '
                    '{"name": "b", "version": "popularity", "share": 0.5}]}')


def parse_user_id(user_id: str | None) -> str:
    if user_id is None or user_id == "":
        raise ApiError(400, "user_id is required")
    if len(user_id) > MAX_ID_CHARS:
        raise ApiError(400, f"user_id longer than {MAX_ID_CHARS} characters")
    if not user_id.isprintable():
        raise ApiError(400, "user_id must be printable characters")
    return user_id


def parse_k(k: str | None) -> int:
    if k is None or k == "":
        return 10
    if not _K_PATTERN.fullmatch(k):
        raise ApiError(400, f"k must be an integer in 1..{MAX_K}, got {k[:20]!r}")
    value = int(k)
    if not 1 <= value <= MAX_K:
        raise ApiError(400, f"k must be in 1..{MAX_K}, got {value}")
    return value


def parse_explain(explain_flag: str | None) -> bool:
    if explain_flag is None or explain_flag == "":
        return False
    lowered = explain_flag.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ApiError(400, f"explain must be true or false, got {explain_flag[:20]!r}")


def parse_list(name: str, value: str | None) -> tuple[str, ...]:
    """"a,b,c" -> ("a", "b", "c"): each value printable, not empty, at most MAX_ID_CHARS,
    at most MAX_LIST_VALUES of them; absent or empty -> ()."""
    if not value:
        return ()
    values = value.split(",")
    if len(values) > MAX_LIST_VALUES:
        raise ApiError(400, f"{name} takes at most {MAX_LIST_VALUES} values, got {len(values)}")
    for v in values:
        if not v or len(v) > MAX_ID_CHARS or not v.isprintable():
            raise ApiError(400, f"{name} values must be 1..{MAX_ID_CHARS} printable characters "
                           f"separated by commas, got {v[:40]!r}")
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int
    explain: bool
    exclude: tuple[str, ...] = ()  # item ids never to return (unknown ones change nothing)
    categories: tuple[str, ...] = ()  # return only items in at least one of these
    query: str | None = None  # what the user asks for now, in words (user_text versions)


@dataclass(frozen=True)
class SimilarQuery:
    item_id: str
    k: int


def _params(params: list[tuple[str, str]], allowed: tuple[str, ...]) -> dict[str, str]:
    """Unknown or repeated parameters are refused (a typo like `kk=5` must not silently
    become the default k)."""
    given: dict[str, str] = {}
    for name, value in params:
        if name not in allowed:
            raise ApiError(400, f"unknown parameter {name[:40]!r}; allowed: "
                           + ", ".join(allowed))
        if name in given:
            raise ApiError(400, f"parameter {name!r} given more than once")
        given[name] = value
    return given


def parse_query_text(query: str | None, max_chars: int) -> str | None:
    """Free text, at most `max_chars` once stripped, printable (no control characters);
    absent or blank -> None."""
    if query is None or not query.strip():
        return None
    query = " ".join(query.split())
    if len(query) > max_chars:
        raise ApiError(400, f"query takes at most {max_chars} characters, got {len(query)}")
    if not query.isprintable():
        raise ApiError(400, "query must be printable text (no control characters)")
    return query


def parse_recommend_query(params: list[tuple[str, str]], max_query_chars: int = 200
                          ) -> RecommendQuery:
    given = _params(params, RECOMMEND_PARAMS)
    return RecommendQuery(parse_user_id(given.get("user_id")), parse_k(given.get("k")),
                          parse_explain(given.get("explain")),
                          parse_list("exclude", given.get("exclude")),
                          parse_list("category", given.get("category")),
                          parse_query_text(given.get("query"), max_query_chars))


def parse_similar_query(params: list[tuple[str, str]]) -> SimilarQuery:
    given = _params(params, SIMILAR_PARAMS)
    item_id = given.get("item_id")
    if not item_id:
        raise ApiError(400, "item_id is required")
    if len(item_id) > MAX_ID_CHARS or not item_id.isprintable():
        raise ApiError(400, f"item_id must be 1..{MAX_ID_CHARS} printable characters")
    return SimilarQuery(item_id, parse_k(given.get("k")))


async def read_json_body(request: Request, expected: str) -> object:
    """A request's JSON body, or a 400 saying what was `expected` (bad JSON, bad UTF-8 and
    nesting too deep for the parser alike)."""
    try:
        return await request.json()
    except (ValueError, RecursionError):
        raise ApiError(400, f"body must be JSON: {expected}") from None


async def read_rollback_version(request: Request) -> int:
    """POST /admin/rollback's body -> the version asked for. A bool is refused although
    Python counts it as an int: `true` is not version 1."""
    body = await read_json_body(request, _ROLLBACK_BODY)
    version = body.get("version") if isinstance(body, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise ApiError(400, f"body must be JSON: {_ROLLBACK_BODY}")
    return version


async def read_experiment_arms(request: Request) -> object:
    """POST /admin/experiments' body -> its `arms` (checked by services.experiments)."""
    body = await read_json_body(request, _EXPERIMENT_BODY)
    if not isinstance(body, dict) or set(body) != {"arms"}:
        raise ApiError(400, f"body must be JSON: {_EXPERIMENT_BODY}")
    return body["arms"]
