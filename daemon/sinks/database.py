"""The database sink: every outcome as rows in SQLite or PostgreSQL, committed before the source moves.

`put()` queues one outcome's rows and waits. One task takes everything queued (up to MAX_BATCH)
and commits it in one transaction on the sink's own thread (one connection, one thread: sqlite3
wants that, and a blocking DB-API call can never stall the event loop). While one transaction
runs, the next results queue up behind it (group commit): a busy daemon commits many results
per transaction and an idle one commits each at once, with no timer adding latency.

Reprocessing a source (after a crash, after a re-drop) replaces its rows: the `images` row is
upserted on `source` (its id stays), its detections are deleted and inserted again, all in the
batch's transaction. A database that is down, locked or full is retried with backoff, forever:
the waiting results keep their capacity slots, so the intake pauses and nothing is lost.
Drivers are imported only here, when a database is configured: sqlite3 (standard library) and
psycopg 3 (the `postgresql` extra).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import structlog

from daemon.checks import DatabaseUrl
from daemon.config import ConfigError
from daemon.jobs import Outcome
from daemon.sinks import SinkError, schema
from daemon.sinks.rows import ImageRow, image_row
from daemon.threads import name_os_thread

log = structlog.get_logger("daemon.sinks.database")
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
MAX_BATCH = 64  # results per transaction, at most
QUEUE_SIZE = 256
SQLITE_BUSY_TIMEOUT_S = 2.0  # a locked SQLite file is waited for this long, then retried with backoff
CONNECT_TIMEOUT_S = 10
MIGRATION_LOCK = 0x1F3D14  # pg_advisory_xact_lock key: two machines never migrate at once

_UPSERT = (
    f"INSERT INTO images ({', '.join(schema.IMAGE_COLUMNS)}) VALUES ({', '.join('?' * len(schema.IMAGE_COLUMNS))})"
    " ON CONFLICT (source) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in schema.IMAGE_COLUMNS[1:])
)
# Detections find their image by its unique source: the whole batch goes in three executemany
# calls (pipelined by psycopg, a C loop in sqlite3), with no round trip per image for its id.
_IMAGE_ID = "(SELECT id FROM images WHERE source = ?)"
_DELETE_DETECTIONS = f"DELETE FROM detections WHERE image_id = {_IMAGE_ID}"


class Dialect:
    """What differs between SQLite and PostgreSQL; SQL is written with `?` placeholders."""

    name = ""
    migrations: tuple[schema.Migration, ...] = ()
    payload_param = "?"

    def __init__(self, url: DatabaseUrl, driver: ModuleType, *, fsync: bool) -> None:
        self.url = url
        self.driver = driver
        self.fsync = fsync
        self.error: type[Exception] = driver.Error
        # The data, not the database, is at fault: retrying cannot help, so only that item fails.
        self.data_errors: tuple[type[Exception], ...] = (driver.IntegrityError, driver.DataError)

    def connect(self) -> Any:
        raise NotImplementedError

    def sql(self, text: str) -> str:
        return text

    def begin(self, conn: Any) -> None:
        """Start a transaction (psycopg starts one by itself)."""

    def lock_for_migration(self, conn: Any) -> None:
        """Keep other daemons from migrating the same database at once."""

    def stamp(self, when: datetime.datetime) -> Any:
        return when


class SQLite(Dialect):
    name = "sqlite"
    migrations = schema.SQLITE

    def __init__(self, url: DatabaseUrl, driver: ModuleType, *, fsync: bool) -> None:
        super().__init__(url, driver, fsync=fsync)
        self.data_errors += (driver.ProgrammingError,)

    def connect(self) -> Any:
        conn = self.driver.connect(self.url.dsn, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # readers never block the daemon's writes
            # FULL: a commit survives power loss, like the fsynced result files; NORMAL: an OS crash
            # may lose the last commits (their sources, still in processing/, are done again).
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys = ON")  # ON DELETE CASCADE
        except BaseException:
            conn.close()
            raise
        return conn

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade later

    def stamp(self, when: datetime.datetime) -> Any:
        return when.isoformat(timespec="milliseconds")  # SQLite's date functions read it


class PostgreSQL(Dialect):
    name = "postgresql"
    migrations = schema.POSTGRESQL
    payload_param = "CAST(? AS JSONB)"

    def connect(self) -> Any:
        return self.driver.connect(self.url.dsn, connect_timeout=CONNECT_TIMEOUT_S, application_name="inferd")

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def lock_for_migration(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))


def open_database(url: DatabaseUrl, *, fsync: bool, on_state: Callable[[bool, str | None], None]) -> Database:
    """The sink for `url`; a missing driver or an unusable SQLite directory is a ConfigError."""
    if url.dialect == "sqlite":
        import sqlite3

        assert url.path is not None
        try:
            url.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                "output.database",
                f"cannot create the directory of {url.path} ({exc.strerror or exc})",
                "point it at a file in a directory this user can create and write",
            ) from None
        return Database(SQLite(url, sqlite3, fsync=fsync), on_state)
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigError(
            "output.database",
            f"PostgreSQL needs the psycopg 3 driver, which cannot be imported ({exc})",
            "install it (pip install 'inferd[postgresql]', or 'psycopg[binary]'), or use a sqlite:/// URL",
        ) from None
    return Database(PostgreSQL(url, psycopg, fsync=fsync), on_state)


@dataclass(slots=True)
class _Pending:
    row: ImageRow
    future: asyncio.Future[None]


class _DataError(Exception):
    pass


class Database:
    """The sink. Run `run()` as a stage; `put()` from the results stage; `close()` at the end."""

    name = "database"

    def __init__(self, dialect: Dialect, on_state: Callable[[bool, str | None], None]) -> None:
        self.dialect = dialect
        self.on_state = on_state  # (up, error): each failed attempt, and the first success after them
        self.failures = 0  # failed attempts, all retried
        self.up: bool | None = None  # None until the first connection
        self.committed = 0  # transactions that stored results
        self.stored = 0  # results committed
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(QUEUE_SIZE)
        self._thread = ThreadPoolExecutor(1, "database", initializer=name_os_thread, initargs=("database",))
        self._conn: Any = None
        self._upsert = dialect.sql(_UPSERT)
        self._delete = dialect.sql(_DELETE_DETECTIONS)
        columns = ", ".join(schema.DETECTION_COLUMNS)
        values = ", ".join([_IMAGE_ID] + ["?"] * (len(schema.DETECTION_COLUMNS) - 2) + [dialect.payload_param])
        self._insert = dialect.sql(f"INSERT INTO detections ({columns}) VALUES ({values})")

    async def put(self, outcome: Outcome) -> None:
        """Return once `outcome`'s rows are committed; SinkError if its data can never be stored."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(image_row(outcome), future))
        await future

    async def run(self) -> None:
        """Connect (and migrate), then commit what is queued, one transaction per batch."""
        await self._retrying([])
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._store(batch)

    async def check(self) -> None:
        """Connect and migrate once (`inferd check`); the driver's error if that fails."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._transaction, [])

    async def close(self) -> None:
        """Close the connection on its thread, after any transaction still running there."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._disconnect)
        finally:
            self._thread.shutdown(wait=False)
        log.info("database_closed", results=self.stored, transactions=self.committed, failures=self.failures)

    async def _store(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]  # a waiter cancelled by a forced stop
        if not batch:
            return
        try:
            await self._retrying([p.row for p in batch])
        except _DataError as exc:
            if len(batch) > 1:  # find the one at fault: the others commit
                for pending in batch:
                    await self._store([pending])
                return
            log.error("database_rejected", source=batch[0].row.source, error=str(exc))
            _settle(batch[0].future, SinkError(f"the database refused the rows: {exc}"))
            return
        for pending in batch:
            _settle(pending.future, None)

    async def _retrying(self, rows: list[ImageRow]) -> None:
        """One transaction with `rows` (none: just connect), retried with backoff until it commits."""
        loop = asyncio.get_running_loop()
        for attempt in itertools.count(1):
            try:
                await loop.run_in_executor(self._thread, self._transaction, rows)
            except self.dialect.data_errors as exc:
                raise _DataError(str(exc)) from exc
            except (self.dialect.error, OSError) as exc:  # the database's fault, not the rows'
                self.failures += 1
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
                error = f"{type(exc).__name__}: {str(exc).strip()}"
                log.error(
                    "database_failed",
                    database=self.dialect.url.redacted,
                    error=error,
                    attempt=attempt,
                    batch=len(rows),
                    retry_in_s=delay,
                )
                self._set_up(False, error)
                await asyncio.sleep(delay)  # backoff: the database must come back before a retry helps
            except Exception as exc:  # a bug met on these rows: they fail, the stream goes on
                log.error("internal_error", stage="database", exc_info=exc)
                raise _DataError(f"{type(exc).__name__}: {exc}") from exc
            else:
                self.committed += bool(rows)
                self.stored += len(rows)
                self._set_up(True, None)
                return

    def _set_up(self, up: bool, error: str | None) -> None:
        """Report every failed attempt, and the first success after start or after failures."""
        if up and self.up is False:
            log.info("database_recovered", database=self.dialect.url.redacted, failures=self.failures)
        if not up or self.up is not True:
            self.up = up
            self.on_state(up, error)

    # Below: the sink's thread only.

    def _transaction(self, rows: list[ImageRow]) -> None:
        conn = self._connection()
        d = self.dialect
        try:
            d.begin(conn)
            if rows:
                latest = list({row.source: row for row in rows}.values())  # a source once per batch
                cur = conn.cursor()
                cur.executemany(self._upsert, [self._image_params(row) for row in latest])
                cur.executemany(self._delete, [(row.source,) for row in latest])
                detections = [
                    (row.source, t.class_id, t.class_name, t.confidence, t.x1, t.y1, t.x2, t.y2,
                     None if t.payload is None else json.dumps(t.payload))
                    for row in latest for t in row.detections
                ]  # fmt: skip
                if detections:
                    cur.executemany(self._insert, detections)
            conn.commit()
        except d.data_errors:
            _rollback(conn)
            raise
        except BaseException:
            self._disconnect()  # a broken connection is not reused: the retry connects afresh
            raise

    def _image_params(self, row: ImageRow) -> tuple[Any, ...]:
        return (
            row.source, row.status, row.reason, row.message, row.width, row.height, row.model, row.task,
            row.device, row.batch_size, self.dialect.stamp(row.processed_at), *row.timings_ms,
        )  # fmt: skip

    def _connection(self) -> Any:
        if self._conn is None:
            conn = self.dialect.connect()
            try:
                applied = self._migrate(conn)
            except BaseException:
                _close(conn)
                raise
            self._conn = conn
            log.info("database_connected", database=self.dialect.url.redacted, migrated=applied)
        return self._conn

    def _migrate(self, conn: Any) -> list[int]:
        """Apply the migrations this database lacks, in one transaction; the versions applied."""
        d = self.dialect
        d.begin(conn)
        d.lock_for_migration(conn)
        cur = conn.cursor()
        cur.execute(schema.MIGRATIONS_TABLE[d.name])
        cur.execute("SELECT COALESCE(MAX(version), 0) FROM inferd_migrations")
        (current,) = cur.fetchone()
        applied = []
        now = d.stamp(datetime.datetime.now(datetime.UTC))
        for version, description, statements in d.migrations:
            if version > current:
                for statement in statements:
                    cur.execute(statement)
                cur.execute(d.sql("INSERT INTO inferd_migrations VALUES (?, ?, ?)"), (version, description, now))
                applied.append(version)
        conn.commit()
        if current > d.migrations[-1][0]:
            log.warning("database_schema_newer", version=current, known=d.migrations[-1][0])
        return applied

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _close(conn)


def _rollback(conn: Any) -> None:
    try:
        conn.rollback()
    except Exception as exc:  # noqa: BLE001 - the connection is dropped anyway on the next error
        log.warning("database_rollback_failed", error=str(exc))


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception as exc:  # noqa: BLE001 - closing a broken connection may fail; it is gone either way
        log.debug("database_close_failed", error=str(exc))


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
