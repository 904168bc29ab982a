"""The one poll loop: wait until a condition holds, with a deadline and a clear error.

Every wait of the service, its tests and benchmarks (an app healthy, every replica on
a version, consumers caught up, an exporter showing a metric) is this loop with a
different check, so a timeout always says what was awaited, for how long, and what the
last look found.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """The condition did not hold by the deadline; `last` is what the last check returned."""

    def __init__(self, what: str, timeout_s: float, last: object):
        super().__init__(f"{what}: not so after {timeout_s:g} s (last check: {last!r:.300})")
        self.last = last


def wait_until(check: Callable[[], T], timeout_s: float, what: str | Callable[[], str],
               interval_s: float = 0.5) -> T:
    """Call `check` until it returns something truthy, and return that.

    The check runs at least once, even with a deadline already past; `interval_s` is the
    pause between checks. Raises WaitTimeout (a TimeoutError) naming `what` (a callable
    is called then, so the message can show state the checks gathered).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(what() if callable(what) else what, timeout_s, value)
        time.sleep(interval_s)


def answers(url: str, client: httpx.Client | None = None,
            timeout_s: float = 5.0) -> httpx.Response | None:
    """GET `url` -> the response if it is a 200, else None (refused, timed out, not 200:
    a proxy that is still starting or overloaded answers 503)."""
    try:
        response = (client or httpx).get(url, timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return response if response.status_code == 200 else None


def wait_answers(url: str, timeout_s: float, what: str = "",
                 interval_s: float = 0.5) -> httpx.Response:
    """Poll `url` (e.g. an app's /healthz) until it answers 200; -> that response."""
    return wait_until(lambda: answers(url), timeout_s, what or f"GET {url} answers 200",
                      interval_s)


def process_rss_mb() -> float:
    """This process's resident memory in MB (/proc on Linux; else its peak, from rusage)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
