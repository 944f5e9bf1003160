"""Test helpers: start real processes (the sandbox store), receive webhooks, free ports."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SandboxProcess:
    """``python -m sandbox serve`` on a free loopback port, as a user would start it.

    ``extra`` (or ``extra_args``) are more ``serve`` flags: ``["--workers", "3", "--prerender",
    "--page-latency", "1-3", "--max-concurrent", "4"]``. ``start_timeout``: seconds to wait for the first
    answer (pre-rendering a large store takes minutes the first time)."""

    def __init__(self, tmp: Path, *, size: str = "tiny", seed: int = 1, tls: bool = False, extra: list[str] | None = None,
                 fresh: bool = True, db: Path | None = None, port: int | None = None,
                 extra_args: list[str] | None = None, start_timeout: float = 120):
        extra = [*(extra or []), *(extra_args or [])]
        self.port = port or free_port()
        self.db = db or tmp / f"store-{size}-{seed}-{self.port}.sqlite"
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.api = f"{self.url}/wp-json/wc/v3"
        args = [sys.executable, "-m", "sandbox", "serve", "--port", str(self.port), "--size", size, "--seed", str(seed),
                "--db", str(self.db), *(["--fresh"] if fresh else []), *(["--tls"] if tls else []), *(extra or [])]
        env = {**os.environ, "SANDBOX_DATA_DIR": str(tmp)}
        self.log = open(tmp / f"sandbox-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.cert = tmp / "tls" / "sandbox-cert.pem"
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                requests.get(self.api, timeout=1, verify=False)
                break
            except requests.RequestException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sandbox did not start: {(tmp / f'sandbox-{self.port}.log').read_text()}") from None
                time.sleep(0.2)

    def client(self, **kwargs):
        from store_sync.store.client import StoreClient

        kwargs.setdefault("requests_per_second", 200)
        kwargs.setdefault("max_in_flight", 4)
        kwargs.setdefault("backoff_base", 0.05)
        from store_sync.store.client import RequestBudget

        budget = RequestBudget(kwargs.pop("requests_per_second"), kwargs.pop("max_in_flight"))
        if self.scheme == "https":
            kwargs.setdefault("verify", str(self.cert))
        return StoreClient(self.url, kwargs.pop("key", "ck_sandbox"), kwargs.pop("secret", "cs_sandbox"),
                           budget=budget, **kwargs)

    def export(self, entity: str) -> list[dict]:
        import json

        out = subprocess.run([sys.executable, "-m", "sandbox", "export", "--db", str(self.db), "--entity", entity,
                              "--base-url", self.url],
                             cwd=REPO, check=True, capture_output=True, text=True).stdout
        return [json.loads(line) for line in out.splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class WebhookReceiver:
    """A loopback HTTP server that records every request it gets (raw body and headers)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, seconds: float = 10) -> list[dict]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            hits = [r for r in self.received if predicate(r)]
            if hits:
                return hits
            time.sleep(0.05)
        raise AssertionError(f"no matching webhook within {seconds}s; got {[r['headers'].get('x-wc-webhook-topic') for r in self.received]}")

    def close(self) -> None:
        self.server.shutdown()


def latest(dsn: str, name: str) -> dict[str, dict]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT l.source_key, r.payload, r.is_delete FROM inbox.latest l JOIN inbox.record r USING (inbox_id) "
            "WHERE l.entity=%s", (name,)).fetchall()
    return {k: (p, d) for k, p, d in rows}


def without_volatile(name: str, doc):
    """``doc`` without the fields the registry calls volatile (changed by the store on every read)."""
    from store_sync.registry import entities

    volatile = entities()[name].volatile if name in entities() else ()
    return {k: v for k, v in doc.items() if k not in volatile} if isinstance(doc, dict) and volatile else doc


def assert_inbox_matches_truth(dsn: str, sandbox, name: str) -> None:
    truth = {str(d["id"]): d for d in sandbox.export(name)}
    landed = latest(dsn, name)
    missing = set(truth) - set(landed)
    assert not missing, f"{name}: {len(missing)} records never landed, e.g. {sorted(missing)[:5]}"
    stale = [k for k, d in truth.items() if without_volatile(name, landed[k][0]) != without_volatile(name, d)]
    assert not stale, f"{name}: {len(stale)} records landed in an old version, e.g. {stale[:5]}"
    with psycopg.connect(dsn) as conn:
        dupes = inbox_duplicates(conn)
    assert dupes == 0, f"{dupes} inbox rows repeat the version landed just before them"


def inbox_duplicates(conn) -> int:
    """Rows whose payload equals the previous landed version of the same record (a revert A → B → A is not one)."""
    return conn.execute(
        "SELECT count(*) FROM (SELECT payload_hash, lag(payload_hash) OVER (PARTITION BY entity, source_key "
        "ORDER BY inbox_id) AS previous FROM inbox.record) v WHERE payload_hash = previous").fetchone()[0]


class CountingProxy:
    """Forwards every request to the sandbox unchanged (Host kept, so OAuth signatures still match) and
    records when each one reached the store and when its answer left."""

    def __init__(self, upstream_port: int, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) to serve HTTPS with, to a sandbox served with ``--tls``."""
        self.requests: list[tuple[float, float, str]] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                started = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = (http.client.HTTPSConnection("127.0.0.1", upstream_port, timeout=60,
                                                    context=ssl._create_unverified_context()) if tls  # noqa: S323
                        else http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60))
                try:
                    conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with lock:
                    outer.requests.append((started, time.monotonic(), self.path.split("?")[0]))

            do_GET = do_POST = do_PUT = _forward  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def store_api(self) -> list[tuple[float, float, str]]:
        return [r for r in self.requests if "/wp-json/" in r[2]]

    def busiest_second(self) -> int:
        starts = sorted(r[0] for r in self.store_api())
        best, j = 0, 0
        for i, t in enumerate(starts):
            while starts[j] < t - 1.0:
                j += 1
            best = max(best, i - j + 1)
        return best

    def most_in_flight(self) -> int:
        events = sorted([(s, 1) for s, _, _ in self.store_api()] + [(e, -1) for _, e, _ in self.store_api()])
        now = best = 0
        for _, step in events:
            now += step
            best = max(best, now)
        return best

    def close(self) -> None:
        self.server.shutdown()
