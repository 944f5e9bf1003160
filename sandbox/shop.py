"""The realistic-shop mode: a hosted shop's speed and its host's limit on concurrent requests.

``--page-latency 1-3`` makes a list page of 100 records take 1 to 3 seconds (drawn from a seeded RNG,
scaled with ``per_page``: 10 records take a tenth of it, with a floor of a tenth, as WordPress's own
bootstrap costs that much on every request); any other request takes a tenth of a page. The time the
sandbox itself spent counts towards it.

``--max-concurrent N`` answers the request past N in flight (over every worker) at once, before any
PHP would run, as the host's front server does. nginx's ``limit_conn`` answers **503** by default
("When this limit is exceeded, the server will return the 503 (Service Temporarily Unavailable)
error", https://nginx.org/en/docs/http/ngx_http_limit_conn_module.html, ``limit_conn_status``), with
no Retry-After; hosts that set ``limit_conn_status 429`` answer 429. ``--over-limit 429`` answers 429
with ``Retry-After: 1``. /work/shared/reference/store-api.md §7: the wc/v3 API has no rate limiting
of its own, limits come from the host (429, sometimes with Retry-After; 503; 508).
"""

from __future__ import annotations

import random
import threading

from fastapi.responses import Response

GATEWAY_503 = ("<html><head><title>503 Service Temporarily Unavailable</title></head><body><center><h1>503 Service "
               "Temporarily Unavailable</h1></center><hr><center>nginx</center></body></html>")


def parse_range(text: str | None) -> tuple[float, float] | None:
    """'1-3' -> (1.0, 3.0); '2' -> (2.0, 2.0); '' / None -> None. Bad input fails in words."""
    if not text:
        return None
    lo, sep, hi = text.partition("-")
    try:
        low, high = float(lo), float(hi) if sep else float(lo)
    except ValueError:
        raise ValueError(f"--page-latency wants SECONDS or LOW-HIGH seconds (e.g. 1-3), not {text!r}") from None
    if low < 0 or high < low:
        raise ValueError(f"--page-latency {text!r}: LOW must be >= 0 and HIGH >= LOW")
    return low, high


class Shop:
    """What the host adds: slots for concurrent requests (shared by every worker) and page latency."""

    def __init__(self, page_latency: tuple[float, float] | None = None, max_concurrent: int = 0,
                 over_limit: int = 503, seed: int = 1, slots=None):
        if over_limit not in (429, 503):
            raise ValueError(f"--over-limit must be 429 or 503, not {over_limit}")
        self.page_latency = page_latency
        self.max_concurrent = max_concurrent
        self.over_limit = over_limit
        self.rng = random.Random(seed * 104729)
        # A process-shared semaphore when workers are forked (made by the parent), else a thread one.
        self.slots = slots if slots is not None else (threading.BoundedSemaphore(max_concurrent) if max_concurrent else None)
        self.refused = 0

    @staticmethod
    def shared_slots(max_concurrent: int):
        """Made before the workers fork: one count of requests in flight for the whole shop."""
        if not max_concurrent:
            return None
        import multiprocessing

        return multiprocessing.get_context("fork").BoundedSemaphore(max_concurrent)

    def enter(self) -> bool:
        return self.slots is None or self.slots.acquire(False)

    def leave(self) -> None:
        if self.slots is not None:
            self.slots.release()

    def in_flight(self) -> int | None:
        """Requests holding a slot now (None where the platform cannot tell)."""
        try:
            return self.max_concurrent - self.slots.get_value()
        except (AttributeError, NotImplementedError):
            return None

    def refusal(self) -> Response:
        self.refused += 1
        if self.over_limit == 429:
            return Response("Too Many Requests", status_code=429, headers={"Retry-After": "1"}, media_type="text/plain")
        return Response(GATEWAY_503, status_code=503, media_type="text/html")

    def seconds(self, per_page: int | None) -> float:
        """How long the answer takes: a page of ``per_page`` records, or (None) any other request."""
        if not self.page_latency:
            return 0.0
        share = 0.1 if per_page is None else max(per_page, 10) / 100
        return self.rng.uniform(*self.page_latency) * share
