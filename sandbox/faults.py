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


class SharedFaults:
    """The fault spec and the counts in shared memory, for ``serve --workers N``: created before the
    workers are forked, so a spec set through ``/sandbox/control`` (answered by any worker) applies to
    every worker's next request, and ``/sandbox/stats`` counts every worker's faults."""

    SPEC_BYTES = 8192

    def __init__(self, spec: str = ""):
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.lock = ctx.Lock()
        self.spec = ctx.RawArray("c", self.SPEC_BYTES)
        self.version = ctx.RawValue("q", 0)
        self.counts = ctx.RawArray("q", len(KINDS))
        self.set_spec(spec)

    def set_spec(self, spec: str) -> None:
        data = spec.encode()
        if len(data) >= self.SPEC_BYTES:
            raise ValueError(f"fault spec longer than {self.SPEC_BYTES - 1} bytes")
        with self.lock:
            self.spec.value = data
            self.version.value += 1


class Faults:
    def __init__(self, spec: str = "", seed: int = 1, slow_seconds: float = 1.5, shared: SharedFaults | None = None):
        self._rates: dict[str, float] = self.parse(spec)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.slow_seconds = slow_seconds
        self.shared = shared
        self._seen = -1
        self._counts: dict[str, int] = {k: 0 for k in KINDS}  # faults injected so far, by kind
        # With ``shared``, the spec is the shared one (set by the parent before the fork, then by
        # /sandbox/control): a worker starting late must not reset what was configured meanwhile.

    @staticmethod
    def parse(spec: str) -> dict[str, float]:
        rates = {}
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            kind, _, rate = part.partition("=")
            if kind not in KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
            rates[kind] = float(rate or 1.0)
        return rates

    @property
    def rates(self) -> dict[str, float]:
        shared = self.shared
        if shared is not None and shared.version.value != self._seen:  # another worker changed the spec
            with shared.lock:
                version, spec = shared.version.value, shared.spec.value.decode()
            self._rates, self._seen = self.parse(spec), version
        return self._rates

    @property
    def counts(self) -> dict[str, int]:
        if self.shared is None:
            return self._counts
        with self.shared.lock:
            return dict(zip(KINDS, self.shared.counts, strict=True))

    def configure(self, spec: str) -> None:
        """Replace the rates at run time (the counts go on)."""
        rates = self.parse(spec)
        with self.lock:
            if self.shared is not None:
                self.shared.set_spec(spec)
            else:
                self._rates = rates

    def roll(self, kind: str) -> bool:
        rate = self.rates.get(kind, 0.0)
        if rate <= 0:
            return False
        with self.lock:
            hit = self.rng.random() < rate
        if hit:
            if self.shared is not None:
                with self.shared.lock:
                    self.shared.counts[KINDS.index(kind)] += 1
            else:
                with self.lock:
                    self._counts[kind] += 1
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
        self.configure("")
