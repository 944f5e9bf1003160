"""Chaos: the whole stack under live changes, bulk edits, every store fault, killed tasks and CRM restarts.

    .venv/bin/python bench/chaos.py [--minutes 10] [--size small] [--rate 3] [--json report.json]

Starts everything the way `make demo` does, on throw-away data under `.data/chaos-*`: two embedded
PostgreSQL servers (the CRM, and Airflow's metadata apart from it so that restarting the CRM does not
take Airflow down), the sandbox store with customer webhooks pointed at the Airflow api-server, and
Airflow's api-server, scheduler, dag-processor and triggerer with the package's DAGs unpaused.

After the initial load, for --minutes:

* the change simulator runs its ``chaos`` profile (orders, transitions, customers, prices, renewals,
  refunds, trashes, restores, permanent deletes) and every --bulk-every seconds a bulk edit of
  --bulk-size records committed together and stamped with one ``date_modified`` second;
* every sandbox fault is on (``sandbox/faults.py``: 429 with and without Retry-After, 500 HTML,
  502/504, slow, truncated, PHP notice, a record shifting mid-read, clock skew, a garbled record, an
  empty page, paging headers stripped, a late write answer; kinds added later get a small rate), and
  the store sorts as a real one (``--legacy-sort`` on sandboxes that still need asking);
* every 30-60 s a running landing or transform task process (Airflow's ``airflow worker -- <ti>``
  under our own scheduler) is SIGKILLed; retries and the continuous runs must recover;
* the CRM's PostgreSQL is restarted --pg-restarts times at random moments (``fast``, then a crash:
  ``immediate``), down for 5-20 s each.

Then the simulator and the faults stop and the integration catches up through its live paths: the
delete reconciliation is triggered (its period is an hour; permanent deletes are invisible otherwise)
and the bench waits until it finished, the inboxes stopped growing for --stable-seconds and the
transform applied everything; "converged" is the time from the quiet to the last inbox row. The
reconcile module then compares the CRM with the store. If differences remain and --settle (default),
it waits for the safety nets as well -- a safety cycle of every watch DAG (max_quiet_seconds, or
--quiet-seconds) and, with --wait-customer-scan, the customers' periodic scan (scan_every_minutes)
after the quiet -- and compares again: what the second comparison still finds is lost, what only
the first found is late. All within --catch-up-minutes. Last, the inboxes are checked for duplicates
(two consecutive versions of one record with the same payload hash; A->B->A is not one) and the
newest inbox version of every record is compared with the store's own rows (so a difference says
whether landing or the transform lost it). Exit status 1 when differences or duplicates remain.
Every process it started is stopped, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psutil  # noqa: E402
import psycopg  # noqa: E402
import requests  # noqa: E402

from store_sync.crm.database import EmbeddedPostgres  # noqa: E402
from store_sync.local.stack import AirflowStack  # noqa: E402
from store_sync.registry import entities  # noqa: E402
from tests.helpers import SandboxProcess, free_port  # noqa: E402

# Per request, per kind (the request kinds are drawn one after the other, so ~7% of calls fail).
FAULT_RATES = {"429": 0.02, "429nr": 0.01, "500": 0.015, "502": 0.005, "504": 0.005, "slow": 0.02,
               "truncated": 0.015, "notice": 0.015, "shift": 0.05, "skew": 0.01, "garbage": 0.005, "empty": 0.01,
               "nopaging": 0.01, "late": 0.01}
LANDING_DAGS = ("store_watch_", "store_snapshot_", "store_reconcile_deletes", "store_backfill")
TRANSFORM_DAGS = ("crm_transform",)
CHILD_KINDS = {"order_notes"}  # landed with their parents; not compared on their own


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def fault_spec(rates: dict[str, float]) -> str:
    """Every kind the sandbox knows (a kind added later gets a small rate too)."""
    from sandbox.faults import KINDS

    return ",".join(f"{k}={rates.get(k, 0.005)}" for k in KINDS)


def sort_flag() -> tuple[list[str], str]:
    """The real store's sort (no id tie-break but for date): ask for it if the sandbox still needs a flag."""
    out = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--help"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    if "--legacy-sort" in out:  # older sandboxes: a tie-break everywhere unless told otherwise
        return ["--legacy-sort"], "no id tie-breaker (--legacy-sort)"
    return [], "the real store's (the sandbox default" + (", not --stable-sort)" if "--stable-sort" in out else ")")


class Chaos:
    """Kills task processes and restarts the CRM's PostgreSQL, each on a thread of its own."""

    def __init__(self, stack: AirflowStack, meta_dsn: str, crm_pg: EmbeddedPostgres, rng: random.Random,
                 kill_every: tuple[float, float], restarts: list[tuple[float, str, float]]):
        self.stack, self.meta_dsn, self.crm_pg, self.rng = stack, meta_dsn, crm_pg, rng
        self.kill_every, self.restart_plan = kill_every, restarts
        self.stop_event = threading.Event()
        self.kills: list[dict] = []
        self.restarts: list[dict] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._guard(self._killer), daemon=True, name="killer"),
                        threading.Thread(target=self._guard(self._restarter), daemon=True, name="restarter")]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(120)
        if not self.crm_pg.is_running():  # never leave the CRM down
            self.crm_pg.start()

    def _guard(self, fn):
        def run():
            try:
                fn()
            except Exception as exc:  # a broken chaos thread must show in the report, not vanish
                self.errors.append(f"{fn.__name__}: {exc!r}")
                log(f"chaos thread {fn.__name__} failed: {exc!r}")
        return run

    # -- killing task processes ---------------------------------------------------------------
    def _ours(self, proc: psutil.Process) -> bool:
        roots = {p.pid for p in self.stack.procs.values()}
        try:
            return any(parent.pid in roots for parent in proc.parents())
        except psutil.Error:
            return False

    def task_processes(self) -> list[tuple[psutil.Process, dict]]:
        """Running task runners (``airflow worker -- <ti id>``) of our own scheduler, with their task."""
        found = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if cmd.startswith("airflow worker -- ") and self._ours(proc):
                found[cmd.split("-- ", 1)[1].strip()] = proc
        if not found:
            return []
        try:
            with psycopg.connect(self.meta_dsn, connect_timeout=5) as conn:
                rows = conn.execute("SELECT id::text, dag_id, task_id, try_number, state FROM task_instance "
                                    "WHERE id::text = ANY(%s)", (list(found),)).fetchall()
        except psycopg.Error:
            return []
        return [(found[r[0]], {"ti": r[0], "dag_id": r[1], "task_id": r[2], "try": r[3], "state": r[4]})
                for r in rows if r[4] == "running"]

    def kill_one(self, prefer: tuple[str, ...], patience: float = 20) -> dict | None:
        """SIGKILL a running landing or transform task (``prefer``red kind if one shows up in time)."""
        deadline = time.monotonic() + patience
        while not self.stop_event.is_set():
            wanted = [(p, t) for p, t in self.task_processes()
                      if t["dag_id"].startswith(LANDING_DAGS + TRANSFORM_DAGS)]
            preferred = [(p, t) for p, t in wanted if t["dag_id"].startswith(prefer)]
            pick = preferred or (wanted if time.monotonic() > deadline - patience / 2 else [])
            if pick:
                proc, ti = self.rng.choice(pick)
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    continue  # finished meanwhile: look again
                ti.update(at=time.time(), pid=proc.pid,
                          kind="transform" if ti["dag_id"].startswith(TRANSFORM_DAGS) else "landing")
                return ti
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        return None

    def _killer(self) -> None:
        n = 0
        while not self.stop_event.wait(self.rng.uniform(*self.kill_every)):
            prefer = LANDING_DAGS if n % 2 == 0 else TRANSFORM_DAGS
            hit = self.kill_one(prefer)
            n += 1
            if hit:
                self.kills.append(hit)
                log(f"killed {hit['dag_id']}.{hit['task_id']} (try {hit['try']}, pid {hit['pid']})")
            else:
                log("no landing or transform task was running to kill within 20 s")

    # -- restarting the CRM database ----------------------------------------------------------------
    def _restarter(self) -> None:
        t0 = time.monotonic()
        for at, mode, down in self.restart_plan:
            if self.stop_event.wait(max(0.0, t0 + at - time.monotonic())):
                return
            began = time.time()
            log(f"stopping the CRM's PostgreSQL ({mode}) for {down:.0f}s")
            self.crm_pg.stop(mode)
            self.stop_event.wait(down)
            self.crm_pg.start()
            self.restarts.append({"mode": mode, "at": began, "down_seconds": round(time.time() - began, 1)})
            log(f"the CRM's PostgreSQL is back after {time.time() - began:.1f}s")


# -- the CRM side ---------------------------------------------------------------------------------
def crm_sample(dsn: str) -> dict | None:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            max_id, rows, unapplied = conn.execute(
                "SELECT coalesce(max(inbox_id), 0), count(*), count(*) FILTER (WHERE applied_at IS NULL) "
                "FROM inbox.record").fetchone()
            scan = conn.execute("SELECT state->>'last_scan' FROM sync.watermark WHERE entity='customers'").fetchone()
            quarantined = conn.execute("SELECT count(*) FROM sync.quarantine").fetchone()[0]
        return {"max_id": max_id, "rows": rows, "unapplied": unapplied, "quarantined": quarantined,
                "customer_scan": scan[0] if scan else None}
    except psycopg.Error:
        return None


DUPLICATES = """
SELECT entity, count(*) FROM (
    SELECT entity, payload_hash,
           lag(payload_hash) OVER (PARTITION BY entity, source_key ORDER BY inbox_id) AS previous
    FROM inbox.record) versions
WHERE payload_hash = previous GROUP BY entity ORDER BY entity
"""


def duplicates(dsn: str) -> dict[str, int]:
    """Two consecutive inbox versions of one record with the same payload (A->B->A is not one)."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(DUPLICATES).fetchall())


def inbox_vs_store(dsn: str, sandbox: SandboxProcess) -> dict[str, dict]:
    """The newest inbox version of every record against the store's own rows: landing's share of a loss.

    ``same_modified_other_fields`` is for information: fields the store derives when it renders
    (a line item's SKU after its product was deleted) change without ``date_modified``, which no
    client can notice; the reconcile's mapped fields are what counts.
    """
    out = {}
    for name in ("orders", "refunds", "subscriptions", "products", "customers"):
        truth = {str(d["id"]): d for d in sandbox.export(name)}
        if name == "products":  # variations land under the products entity too
            truth.update({str(d["id"]): d for d in sandbox.export("variations")})
        landed = newest_landed(dsn, name)
        older, other_fields = [], Counter()
        for key, doc in truth.items():
            if key not in landed:
                continue
            payload = landed[key][0] or {}
            store_mod, inbox_mod = doc.get("date_modified_gmt"), payload.get("date_modified_gmt")
            if store_mod and inbox_mod and inbox_mod < store_mod:
                older.append(key)
            elif payload != doc:
                other_fields.update(k for k in set(doc) | set(payload) if k != "_links" and doc.get(k) != payload.get(k))
        out[name] = {"store": len(truth), "never_landed": sorted(set(truth) - set(landed), key=int),
                     "older_in_inbox": sorted(older, key=int),
                     "deleted_in_store_live_in_inbox": sorted((k for k, (_, d) in landed.items()
                                                               if k not in truth and not d), key=int),
                     "same_modified_other_fields": dict(other_fields)}
    return out


def newest_landed(dsn: str, name: str) -> dict[str, tuple[dict | None, bool]]:
    """{key: (newest version's payload, deleted for good)} by the transform's own rule: the version with
    the newest source time (then the latest arrival), unless a delete event (``{"deleted": true}``)
    arrived after every version."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT source_key, inbox_id, source_modified_at, payload FROM inbox.record "
                            "WHERE entity=%s ORDER BY source_key, inbox_id", (name,)).fetchall()
    newest: dict[str, tuple] = {}
    last_seen: dict[str, int] = {}
    gone_at: dict[str, int] = {}
    floor = datetime.min.replace(tzinfo=UTC)
    for key, inbox_id, modified, payload in rows:
        if isinstance(payload, dict) and payload.get("deleted") is True:
            gone_at[key] = inbox_id
            continue
        last_seen[key] = inbox_id
        rank = (modified or floor, inbox_id)
        if key not in newest or rank >= newest[key][0]:
            newest[key] = (rank, payload)
    return {k: (newest[k][1] if k in newest else None, gone_at.get(k, -1) > last_seen.get(k, -1))
            for k in set(newest) | set(gone_at)}


# -- Airflow's REST API -----------------------------------------------------------------------------
def api_token(stack: AirflowStack) -> str:
    answer = requests.post(f"{stack.url}/auth/token", json={"username": "admin", "password": stack.admin_password()},
                           timeout=10)
    answer.raise_for_status()
    return answer.json()["access_token"]


def trigger(stack: AirflowStack, dag_id: str) -> str:
    answer = requests.post(f"{stack.url}/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None},
                           headers={"Authorization": f"Bearer {api_token(stack)}"}, timeout=30)
    answer.raise_for_status()
    return answer.json()["dag_run_id"]


def run_state(meta_dsn: str, dag_id: str, run_id: str) -> str | None:
    with psycopg.connect(meta_dsn) as conn:
        row = conn.execute("SELECT state FROM dag_run WHERE dag_id=%s AND run_id=%s", (dag_id, run_id)).fetchone()
    return row[0] if row else None


def airflow_outcome(meta_dsn: str, since: datetime) -> dict:
    """What the chaos did to Airflow: failed tries, retries that succeeded, failed runs, per DAG."""
    with psycopg.connect(meta_dsn) as conn:
        tries = conn.execute(
            "SELECT dag_id, state, count(*) FROM task_instance_history WHERE start_date >= %s GROUP BY 1, 2",
            (since,)).fetchall()
        retried_ok = conn.execute(
            "SELECT dag_id, count(*) FROM task_instance WHERE try_number > 1 AND state='success' AND start_date >= %s "
            "GROUP BY 1", (since,)).fetchall()
        runs = conn.execute("SELECT dag_id, state, count(*) FROM dag_run WHERE start_date >= %s GROUP BY 1, 2",
                            (since,)).fetchall()
        live = conn.execute("SELECT dag_id, count(*) FROM dag_run WHERE state IN ('running', 'queued') GROUP BY 1"
                            ).fetchall()
    out: dict[str, dict] = {}
    for dag_id, state, n in tries:
        out.setdefault(dag_id, {})[f"earlier tries {state}"] = n
    for dag_id, n in retried_ok:
        out.setdefault(dag_id, {})["succeeded on a retry"] = n
    for dag_id, state, n in runs:
        out.setdefault(dag_id, {})[f"runs {state}"] = n
    for dag_id, n in live:
        out.setdefault(dag_id, {})["runs active now"] = n
    return out


def catch_up(stack: AirflowStack, meta: str, crm: str, *, since: float, deadline: float, stable: float,
             wait_scan: bool) -> dict:
    """Trigger the delete reconciliation, then wait until it finished, the inboxes have not grown for
    ``stable`` seconds, the transform applied every row (and, with ``wait_scan``, the customers' periodic
    scan ran after ``since``)."""
    run_id = None
    try:
        run_id = trigger(stack, "store_reconcile_deletes")
    except requests.RequestException as exc:
        log(f"could not trigger store_reconcile_deletes: {exc}")
    last_max, last_row = None, time.time()
    since_gmt = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    while time.time() < deadline:
        time.sleep(5)
        sample = crm_sample(crm)
        if sample is None:
            continue
        if sample["max_id"] != last_max:
            last_max, last_row = sample["max_id"], time.time()
        deletes = run_state(meta, "store_reconcile_deletes", run_id) if run_id else "not triggered"
        scanned = not wait_scan or (sample["customer_scan"] or "") >= since_gmt
        if sample["unapplied"] == 0 and deletes in ("success", "failed", "not triggered") and scanned \
                and time.time() - last_row >= stable:
            return {"converged": True, "last_row": last_row, "deletes": deletes}
    deletes = run_state(meta, "store_reconcile_deletes", run_id) if run_id else "not triggered"
    return {"converged": False, "last_row": last_row, "deletes": deletes}


def as_dict(reports) -> dict:
    """Every list the reconcile Report keeps (kinds it may add later included)."""
    out = {}
    for r in reports:
        lists = {k: v for k, v in vars(r).items() if isinstance(v, list)}
        out[r.entity] = {"store": r.store_count, "crm": r.crm_count, **lists}
    return out


# -- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long the chaos lasts (after the initial load)")
    parser.add_argument("--size", default="small", help="sandbox store size (tiny, small, 10k, ...)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    parser.add_argument("--rate", type=float, default=3.0, help="simulated store changes per second")
    parser.add_argument("--bulk-every", type=float, default=60, help="seconds between bulk edits (0: none)")
    parser.add_argument("--bulk-size", type=int, nargs=2, default=(200, 600), metavar=("MIN", "MAX"))
    parser.add_argument("--faults", default=None, help="sandbox fault spec (default: every kind, see FAULT_RATES)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(30, 60), metavar=("MIN", "MAX"))
    parser.add_argument("--pg-restarts", type=int, default=2)
    parser.add_argument("--catch-up-minutes", type=float, default=20, help="at most this long after the quiet")
    parser.add_argument("--stable-seconds", type=float, default=60,
                        help="caught up when the inboxes have not grown for this long and all is applied")
    parser.add_argument("--settle", action=argparse.BooleanOptionalAction, default=True,
                        help="when differences remain after the live paths caught up, wait for the safety nets "
                             "(a safety cycle of every watch DAG, the customers' scan) and compare again")
    parser.add_argument("--wait-customer-scan", action=argparse.BooleanOptionalAction, default=True,
                        help="settling includes the customers' periodic scan (scan_every_minutes) after the quiet")
    parser.add_argument("--scan-minutes", type=float, default=None,
                        help="scan_every_minutes of the customers' scan (Variable store_sync_overrides); default: the registry's")
    parser.add_argument("--quiet-seconds", type=float, default=None,
                        help="max_quiet_seconds for every entity (Variable store_sync_overrides); default: the registry's")
    parser.add_argument("--json", help="write the report here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (logs, databases) afterwards")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    chaos_seconds = args.minutes * 60

    (REPO / ".data").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="chaos-", dir=REPO / ".data"))
    log(f"chaos bench: {args.minutes} min, store {args.size}, seed {args.seed}, data in {work}")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    meta_pg = EmbeddedPostgres(work / "meta-pg", port=free_port())
    crm_pg = EmbeddedPostgres(work / "crm-pg", port=free_port())
    sandbox = stack = chaos = None
    report: dict = {"seed": args.seed, "minutes": args.minutes, "size": args.size}
    try:
        meta_pg.start()
        crm_pg.start()
        crm = crm_pg.dsn()
        meta = meta_pg.dsn("airflow")
        flag, report["sort"] = sort_flag()
        sandbox = SandboxProcess(work, size=args.size, seed=args.seed, extra=["--webhook-delay", "0.2", *flag])
        airflow_port = free_port()
        secret = "chaos-webhook-secret"
        # The package's own webhook settings (the api-server's URL, the secret) in the store connection.
        store_conn = json.dumps({"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox",
                                 "password": "cs_sandbox", "extra": {
                                     "requests_per_second": 20, "max_in_flight": 3,
                                     "webhook_url": f"http://127.0.0.1:{airflow_port}", "webhook_secret": secret}})
        os.environ["AIRFLOW_CONN_STORE_API"] = store_conn  # this process registers the webhooks below
        extra_env = {"CRM_DATABASE_URL": crm, "AIRFLOW_CONN_STORE_API": store_conn}
        tuned = {**({"max_quiet_seconds": args.quiet_seconds} if args.quiet_seconds else {}),
                 **({"scan_every_minutes": args.scan_minutes} if args.scan_minutes else {})}
        if tuned:
            extra_env["AIRFLOW_VAR_STORE_SYNC_OVERRIDES"] = json.dumps({"*": tuned})
        stack = AirflowStack(work / "airflow", meta.replace("postgresql://", "postgresql+psycopg://", 1),
                             port=airflow_port, extra_env=extra_env)
        t0 = time.time()
        stack.setup()
        stack.start()
        from store_sync.store.webhooks import register_webhooks

        log(f"webhooks: {register_webhooks()}")  # once the receiver answers, as `make demo` does
        log(f"Airflow up in {time.time() - t0:.0f}s (UI {stack.url}, admin / {work / 'airflow' / 'passwords.json'}); "
            "waiting for the initial load…")

        # 1. the initial load: every entity has a watermark and the transform applied everything
        parents = sorted(n for n, e in entities().items() if e.strategy != "children")
        deadline = time.time() + 900
        while True:
            try:
                with psycopg.connect(crm, connect_timeout=3) as conn:
                    ready = conn.execute("SELECT count(*) FROM sync.watermark WHERE entity = ANY(%s) AND "
                                         "cursor_at IS NOT NULL", (parents,)).fetchone()[0]
                    unapplied = conn.execute("SELECT count(*) FROM inbox.record WHERE applied_at IS NULL").fetchone()[0]
            except psycopg.Error:
                ready, unapplied = 0, -1
            if ready == len(parents) and unapplied == 0:
                break
            if time.time() > deadline:
                raise RuntimeError(f"the initial load did not finish in 15 minutes ({ready}/{len(parents)} "
                                   f"watermarks, {unapplied} unapplied)")
            time.sleep(3)
        report["initial_load_seconds"] = round(time.time() - t0)
        log(f"initial load done in {time.time() - t0:.0f}s; chaos for {args.minutes} min")

        # 2. chaos
        spec = args.faults if args.faults is not None else fault_spec(FAULT_RATES)
        control = f"{sandbox.url}/sandbox/control"
        requests.post(control, json={"rate": args.rate, "profile": "chaos", "bulk_every": args.bulk_every,
                                     "bulk_size": list(args.bulk_size), "faults": spec}, timeout=30).raise_for_status()
        chaos_started = datetime.now(UTC)
        plan = []
        modes = ["fast", "immediate"]
        for i in range(args.pg_restarts):  # spread over the middle of the run, apart from each other
            slot = (0.15 + 0.7 * i / max(1, args.pg_restarts), 0.15 + 0.7 * (i + 1) / max(1, args.pg_restarts))
            plan.append((rng.uniform(*slot) * chaos_seconds, modes[i % 2], rng.uniform(5, 20)))
        chaos = Chaos(stack, meta, crm_pg, rng, tuple(args.kill_every), plan)
        chaos.start()
        end = time.monotonic() + chaos_seconds
        while time.monotonic() < end:
            time.sleep(min(30.0, max(0.0, end - time.monotonic())))
            stats = requests.get(f"{sandbox.url}/sandbox/stats", timeout=30).json()
            sample = crm_sample(crm) or {}
            log(f"changes {sum(stats['simulator']['changes'].values())} (+{sum(stats['simulator']['bulk_records'].values())}"
                f" in bulk), faults {sum(stats['faults'].values())}, kills {len(chaos.kills)}, restarts "
                f"{len(chaos.restarts)}; inbox rows {sample.get('rows', '?')}, unapplied {sample.get('unapplied', '?')}")
        chaos.stop()
        stats = requests.post(control, json={"rate": 0, "faults": ""}, timeout=120).json()
        quiet = time.time()
        log("the store is quiet (simulator and faults off); catching up…")

        # 3. catch up through the live paths: the delete reconciliation, the inboxes stop growing, all applied
        from store_sync.crm.reconcile import reconcile, render

        deadline = quiet + args.catch_up_minutes * 60
        caught = catch_up(stack, meta, crm, since=quiet, deadline=deadline, stable=args.stable_seconds, wait_scan=False)
        report["converged"] = caught["converged"]
        report["converge_seconds"] = round(caught["last_row"] - quiet, 1)
        report["delete_reconciliation"] = caught["deletes"]
        log(f"{'caught up' if caught['converged'] else 'NOT caught up'}: last inbox row {report['converge_seconds']}s "
            f"after the store went quiet" + ("" if caught["converged"] else f" (gave up at {args.catch_up_minutes} min)"))
        reports = reconcile(crm, sandbox.client(max_retries=10))
        print(render(reports, show=10), flush=True)
        report["live_paths"] = as_dict(reports)

        # 4. ...and, if something is still missing, after the safety nets: a safety cycle of every watch DAG
        # (max_quiet_seconds) and the customers' periodic scan, both after the store went quiet
        if args.settle and not all(r.ok for r in reports) and time.time() < deadline:
            quiet_cycle = args.quiet_seconds or max(e.max_quiet_seconds for e in entities().values())
            log(f"differences remain: waiting for the safety nets (a {quiet_cycle:.0f}s safety cycle"
                + (", the customers' periodic scan" if args.wait_customer_scan else "") + ")…")
            settle_from = time.time()
            while time.time() < min(deadline, settle_from + quiet_cycle + 30):
                time.sleep(5)
            caught = catch_up(stack, meta, crm, since=quiet, deadline=deadline, stable=args.stable_seconds,
                              wait_scan=args.wait_customer_scan)
            report["settled"] = caught["converged"]
            report["settle_seconds"] = round(time.time() - quiet, 1)
            log(f"{'settled' if caught['converged'] else 'NOT settled'} {report['settle_seconds']}s after the store went quiet")
            reports = reconcile(crm, sandbox.client(max_retries=10))
            print(render(reports, show=10), flush=True)

        # 5. the verdict
        dupes = duplicates(crm)
        inbox = inbox_vs_store(crm, sandbox)
        sample = crm_sample(crm) or {}
        report.update({
            "changes": stats["simulator"]["changes"], "refused": stats["simulator"]["refused"],
            "bulk_records": stats["simulator"]["bulk_records"], "store_events": stats["simulator"]["store_events"],
            "faults": stats["faults"], "kills": chaos.kills, "restarts": chaos.restarts, "chaos_errors": chaos.errors,
            "differences": as_dict(reports), "duplicates": dupes, "inbox_vs_store": inbox,
            "quarantined": sample.get("quarantined"), "airflow": airflow_outcome(meta, chaos_started),
        })
        print_summary(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        bad = sum(len(x) for v in report["differences"].values() for x in v.values() if isinstance(x, list)) \
            + sum(dupes.values())
        return 1 if bad else 0
    finally:
        if chaos is not None:
            chaos.stop_event.set()
        if stack is not None:
            stack.stop()
        if sandbox is not None:
            sandbox.stop()
        for pg in (crm_pg, meta_pg):
            try:
                pg.stop()
            except Exception as exc:
                log(f"could not stop {pg.data_dir}: {exc}")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_summary(r: dict) -> None:
    def line(label: str, counts: dict) -> None:
        total = sum(counts.values())
        print(f"{label:<22} {total:>6}  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1])))

    print(f"\n=== chaos: {r['minutes']} min, store {r['size']}, seed {r['seed']}, sort: {r['sort']} ===")
    line("changes (simulator)", r["changes"])
    line("records in bulk edits", r["bulk_records"])
    line("store events", r["store_events"])
    if r["refused"]:
        line("refused / nothing to do", r["refused"])
    line("faults injected", r["faults"])
    line("tasks killed", dict(Counter(f"{k['dag_id']}.{k['task_id']}" for k in r["kills"])))
    print(f"{'CRM restarts':<22} {len(r['restarts']):>6}  " + ", ".join(
        f"{x['mode']} down {x['down_seconds']}s" for x in r["restarts"]))
    if r["chaos_errors"]:
        print(f"chaos errors: {r['chaos_errors']}")
    for dag_id, outcome in sorted(r["airflow"].items()):
        print(f"  {dag_id:<34} " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())))
    print(f"{'converged':<22} {'yes' if r['converged'] else 'NO':>6}  last inbox row {r['converge_seconds']}s after the "
          f"store went quiet; delete reconciliation: {r.get('delete_reconciliation')}; quarantined rows: {r['quarantined']}")
    def differences(title: str, diffs: dict) -> None:
        print(title)
        for entity, d in diffs.items():
            n = {k: len(v) for k, v in d.items() if isinstance(v, list)}
            print(f"  {entity:<14} store {d['store']:>6} CRM {d['crm']:>6}  " + (", ".join(
                f"{k} {v}" for k, v in n.items() if v) or "OK") + "".join(
                f"\n      {k}: {d[k][:8]}" for k in n if d[k]))

    differences("differences once the live paths caught up (make reconcile):", r["live_paths"])
    if "settled" in r:
        print(f"{'settled':<22} {'yes' if r['settled'] else 'NO':>6}  {r['settle_seconds']}s after the store went quiet")
        differences("differences after the safety nets too (make reconcile):", r["differences"])
    print("inbox (newest version) against the store's rows:")
    for entity, d in r["inbox_vs_store"].items():
        n = {k: len(v) for k, v in d.items() if isinstance(v, list)}
        print(f"  {entity:<14} store {d['store']:>6}  " + ", ".join(f"{k} {v}" for k, v in n.items())
              + "".join(f"\n      {k}: {v[:10]}" for k, v in d.items() if isinstance(v, list) and v)
              + (f"\n      same modified time, other fields (derived, informational): {d['same_modified_other_fields']}"
                 if d["same_modified_other_fields"] else ""))
    print(f"duplicates in the inboxes: {sum(r['duplicates'].values())} {r['duplicates'] or ''}")


if __name__ == "__main__":
    sys.exit(main())
