"""``serve --workers N``: several processes serving one store, as PHP-FPM workers serve one shop.

The parent binds the port, forks N workers that accept on it, and only watches them (one dies: all
stop). What the workers share, they share the way a real shop's PHP workers do:

* the store: one SQLite file in WAL mode; every read-then-write sequence holds the store's
  ``WriteLock`` (an ``flock`` beside the file), single statements wait on SQLite's busy timeout;
* the faults: the spec and the counts live in shared memory (``SharedFaults``), so a fault set
  through ``/sandbox/control`` on any worker applies to every worker's next request;
* the clock skew, the store events counted for ``/sandbox/stats`` and the host's slots for
  ``--max-concurrent`` (a process-shared semaphore): shared memory as well;
* the change simulator runs in worker 0 only; the other workers hand ``/sandbox/*`` to worker 0
  over a Unix socket, so there is exactly one simulator and one answer for its stats;
* webhooks: each worker delivers the changes written through it (each change is written, so
  delivered, once), from the webhooks table every worker reads.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import traceback

from fastapi import Request
from fastapi.responses import Response

from .faults import SharedFaults
from .shop import Shop

RESOURCES = ("order", "subscription", "product", "customer", "coupon")
EVENTS = ("created", "updated", "deleted", "restored")
EVENT_KEYS = [f"{r}.{e}" for r in RESOURCES for e in EVENTS]


class Shared:
    """Made by the parent before the fork, inherited by every worker."""

    def __init__(self, fault_spec: str, max_concurrent: int):
        ctx = multiprocessing.get_context("fork")
        self.faults = SharedFaults(fault_spec)
        self.clock = ctx.RawValue("d", 0.0)
        self.slots = Shop.shared_slots(max_concurrent)
        self.events_lock = ctx.Lock()
        self.events = ctx.RawArray("q", len(EVENT_KEYS))

    def count_event(self, resource: str, event: str, _record_id: int) -> None:
        key = f"{resource}.{event}"
        if key in EVENT_KEYS:
            with self.events_lock:
                self.events[EVENT_KEYS.index(key)] += 1

    def store_events(self) -> dict[str, int]:
        with self.events_lock:
            return {k: v for k, v in zip(EVENT_KEYS, self.events, strict=True) if v}


def mount_forward(app, control_path: str, tls: bool) -> None:
    """``/sandbox/*`` on a worker other than 0: asked of worker 0, which runs the simulator."""
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=control_path, verify=False)
    client = httpx.AsyncClient(transport=transport, base_url=("https" if tls else "http") + "://sandbox", timeout=300)

    @app.api_route("/sandbox/{rest:path}", methods=["GET", "POST"])
    async def forward(request: Request, rest: str):
        answer = await client.request(request.method, f"/sandbox/{rest}", content=await request.body(),
                                      headers={"content-type": request.headers.get("content-type", "application/json")})
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type"))


def _die_with_parent() -> None:
    try:  # Linux: PR_SET_PDEATHSIG, so a killed parent takes its workers along
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def supervise(workers: int, host: str, port: int, run_worker) -> None:
    """Bind, fork ``workers`` processes running ``run_worker(index, sockets, control_path)``, watch them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.set_inheritable(True)
    control_path = os.path.join(tempfile.gettempdir(), f"sandbox-{os.getpid()}-{port}.sock")
    if os.path.exists(control_path):
        os.unlink(control_path)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(control_path)
    control.listen(256)
    parent = os.getpid()
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with_parent()
                if os.getppid() != parent:
                    os._exit(0)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                sockets = [listener, control] if index == 0 else [listener]
                if index:
                    control.close()
                run_worker(index, sockets, control_path)
            except BaseException:  # noqa: BLE001 - a worker reports its own death, then exits
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    listener.close()
    control.close()

    def stop(_sig=None, _frame=None) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        _pid, status = os.wait()  # the first worker to end ends the shop
        code = os.waitstatus_to_exitcode(status)
        stop()
        deadline = time.monotonic() + 10
        alive = set(children) - {_pid}
        while alive and time.monotonic() < deadline:
            done, _ = os.waitpid(-1, os.WNOHANG)
            if done:
                alive.discard(done)
            else:
                time.sleep(0.05)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    finally:
        if os.path.exists(control_path):
            os.unlink(control_path)
    sys.exit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code)
