"""Fault injection: what hosts, WAFs and PHP do to API clients in the wild.

``--faults "429=0.05,500=0.02,shift=0.1"`` sets a probability per kind; draws come from a seeded
RNG so a failing test replays the same faults.

Kinds:
  429          429 with ``Retry-After: 1`` (host rate limit)
  429nr        429 without Retry-After
  500          500 with an HTML PHP fatal-error page
  502, 504     gateway error HTML, after a delay (``--slow-seconds``)
  slow         a correct answer, late
  truncated    200 whose JSON body is cut short
  notice       200 whose JSON is preceded by a PHP notice
  shift        while a list page is served, one record of the filtered set is modified
               (a record modified while a client pages through)
  skew         the store's clock jumps a few seconds back and forth
  garbage      one record of a list page carries a broken field (a plugin wrote "N/A" into a total)
  junk         one element of a list page is no record (false, null, "", an object without id)
  empty        a list answer replaced by ``[]``, headers kept (a page cache or WAF answering stale)
  nopaging     X-WP-Total, X-WP-TotalPages and Link stripped (a proxy or CDN that drops headers)
  late         a write is applied, then its answer comes ``--slow-seconds`` late (a client may time out
               or die before it learns that the store did it)
"""

from __future__ import annotations

import random
import threading

KINDS = ("429", "429nr", "500", "502", "504", "slow", "truncated", "notice", "shift", "skew", "garbage", "empty",
         "nopaging", "late", "junk")

PHP_FATAL = (
    "<html><head><title>WordPress &rsaquo; Error</title></head><body id=\"error-page\">"
    "<p>There has been a critical error on this website.</p>"
    "<p><a href=\"https://wordpress.org/documentation/article/faq-troubleshooting/\">"
    "Learn more about troubleshooting WordPress.</a></p></body></html>"
)
GATEWAY = "<html><head><title>{code} {reason}</title></head><body><center><h1>{code} {reason}</h1></center>" \
          "<hr><center>nginx</center></body></html>"
PHP_NOTICE = "<br />\n<b>Notice</b>:  Undefined index: billing in <b>/var/www/html/wp-content/plugins/x.php</b> on line <b>42</b><br />\n"


class Faults:
    def __init__(self, spec: str = "", seed: int = 1, slow_seconds: float = 1.5):
        self.rates: dict[str, float] = self.parse(spec)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.slow_seconds = slow_seconds
        self.counts: dict[str, int] = {k: 0 for k in KINDS}  # faults injected so far, by kind

    @staticmethod
    def parse(spec: str) -> dict[str, float]:
        rates = {}
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            kind, _, rate = part.partition("=")
            if kind not in KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
            rates[kind] = float(rate or 1.0)
        return rates

    def configure(self, spec: str) -> None:
        """Replace the rates at run time (the counts go on)."""
        rates = self.parse(spec)
        with self.lock:
            self.rates = rates

    def roll(self, kind: str) -> bool:
        rate = self.rates.get(kind, 0.0)
        if rate <= 0:
            return False
        with self.lock:
            hit = self.rng.random() < rate
            if hit:
                self.counts[kind] += 1
            return hit

    def pick_request_fault(self) -> str | None:
        """The fault (if any) that replaces the response before the handler runs."""
        for kind in ("429", "429nr", "500", "502", "504", "slow"):
            if self.roll(kind):
                return kind
        return None

    def pick_body_fault(self) -> str | None:
        for kind in ("truncated", "notice", "empty", "nopaging"):
            if self.roll(kind):
                return kind
        return None

    def clear(self) -> None:
        self.rates.clear()
