"""Live-metrics attribution and the canary trial, on the actor's state (no Kafka)."""

import json
import time

from services.config_sources import load_settings
from streaming.live_metrics import LiveMetrics, Tally, read_impression


def _metrics(**changes) -> LiveMetrics:
    live = LiveMetrics.__new__(LiveMetrics)  # the state without the Kafka thread
    live._init_state(load_settings(env={}).replace(**changes), "127.0.0.1:9")
    return live


def _impression(live, request_id, user, items, version=1, arm="serving", ts=None):
    live._impression(json.dumps({"request_id": request_id, "user_id": user, "items": items,
                                 "prompt_version": version, "arm": arm,
                                 "ts": time.time() if ts is None else ts}).encode())


def _event(live, user, item, request_id=None, ts=None):
    body = {"event_id": f"e-{time.time_ns()}", "user_id": user, "item_id": item,
            "ts": time.time() if ts is None else ts, "type": "click"}
    if request_id:
        body["request_id"] = request_id
    return live._attribute(user.encode(), json.dumps(body).encode())


def test_events_are_credited_to_the_quoted_or_the_latest_impression():
    live = _metrics(live_k=3)
    _impression(live, "r1", "ann", ["a", "b", "c", "d"], version=1)
    _impression(live, "r2", "ann", ["x", "y", "z"], version=2)
    assert _event(live, "ann", "b", request_id="r1") == (1, "serving")  # position 1
    assert _event(live, "ann", "y") == (2, "serving")  # latest impression, position 1
    assert _event(live, "ann", "d", request_id="r1") == (1, "serving")  # beyond live_k
    v1, v2 = (live.tallies[(v, "serving")].summary() for v in (1, 2))
    assert (v1["events"], v1["hits"], v2["hits"]) == (2, 1, 1)
    assert v2["ndcg"] == round(1 / 1.584962500721156, 4)


def test_clicks_credited_to_an_answer_that_read_a_query_remember_it():
    """A round trains the query gate on "asked q, then clicked i": the query of the
    impression a click is credited to, by its request_id or as the user's latest."""
    live = _metrics()
    live._impression(json.dumps({"request_id": "r1", "user_id": "ann", "items": ["a"],
                                 "prompt_version": 1, "arm": "serving", "ts": time.time(),
                                 "query": "a comedy"}).encode())
    _impression(live, "r2", "bob", ["b"])  # written before the field existed: no query
    events = {}
    for name, user, request_id in (("quoted", "ann", "r1"), ("latest", "ann", None),
                                   ("plain", "bob", "r2"), ("stranger", "cat", "r1")):
        body = {"event_id": name, "user_id": user, "item_id": "a", "ts": time.time(),
                "type": "click", **({"request_id": request_id} if request_id else {})}
        events[name] = live._attribute(user.encode(), json.dumps(body).encode())
    assert events["stranger"] is None  # someone else's request: not credited, not kept
    assert live.asked_queries() == {"quoted": "a comedy", "latest": "a comedy"}
    assert read_impression(json.dumps({"request_id": "r", "user_id": "u", "items": [],
                                       "prompt_version": 1, "arm": "serving", "ts": 1,
                                       "query": None}).encode()).query == ""


def test_events_with_nothing_to_credit_are_counted_not_guessed():
    live = _metrics(attribution_window_s=60)
    _impression(live, "r1", "ann", ["a"], ts=time.time() - 600)
    assert _event(live, "ann", "a") is None  # too old for the window
    assert _event(live, "bob", "a") is None  # never served
    assert _event(live, "bob", "a", request_id="r1") is None  # someone else's request
    assert live._attribute(b"ann", b"{not json") is None  # served, so read: invalid
    live._impression(b'{"request_id": 1}')
    assert live.counts == {"impressions": 1, "events": 3, "attributed": 0,
                           "unattributed": 3, "invalid": 2}
    assert read_impression(b"[]") is None and read_impression(b'{"items": 3}') is None


def test_the_canary_trial_counts_only_its_versions_since_it_started():
    live = _metrics()
    started = time.time()
    live.trial = {"canary": 3, "serving": 2, "since": started,
                  "arms": {"canary": Tally(),
                           "serving": Tally()}}
    _impression(live, "old", "ann", ["a"], version=2, ts=started - 5)
    _impression(live, "c1", "bob", ["a"], version=3, arm="canary")
    _impression(live, "s1", "cid", ["a"], version=2)
    _impression(live, "s0", "dan", ["a"], version=1)  # an older version, still cached
    for user, item in (("ann", "a"), ("bob", "a"), ("cid", "b"), ("dan", "a")):
        _event(live, user, item)
    arms = live.trial["arms"]
    assert (arms["canary"].events, arms["canary"].hits) == (1, 1)
    assert (arms["serving"].events, arms["serving"].hits) == (1, 0)


def test_experiment_arms_are_counted_apart_and_every_click_counts_for_popularity():
    live = _metrics(live_k=3)
    for request_id, user, arm, items in (("r1", "ann", "model", ["a", "b"]),
                                         ("r2", "bob", "pop", ["c", "d"])):
        live._impression(json.dumps({"request_id": request_id, "user_id": user,
                                     "items": items, "prompt_version": 1 if arm == "model"
                                     else 0, "arm": arm, "experiment": "exp1",
                                     "ts": time.time()}).encode())
    _impression(live, "r3", "cid", ["a"])  # outside the experiment
    assert _event(live, "ann", "b", request_id="r1") == (1, "model")
    assert _event(live, "bob", "x") == (0, "pop")
    assert _event(live, "cid", "a") == (1, "serving")
    assert _event(live, "dan", "a") is None  # never served: not attributed, still counted
    arms = live.experiment_arms("exp1")
    assert set(arms) == {"model", "pop"} and live.experiment_arms("exp2") == {}
    assert (arms["model"]["events"], arms["model"]["hits"], arms["pop"]["hits"]) == (1, 1, 0)
    assert arms["model"]["ndcg_sq"] == arms["model"]["ndcg"] ** 2
    assert live.popular(1) == [("a", 2)]
    live._attribute(b"eve", b"{not json")  # a bad record counts for nothing
    assert dict(live.popular(10)) == {"a": 2, "b": 1, "x": 1}
