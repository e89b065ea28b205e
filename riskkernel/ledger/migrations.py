"""The ledger's schema, as append-only named migrations. Never edit one that has shipped: add another.

Each migration runs in its own transaction and is recorded in `_migrations`. Money is stored as whole
picodollars (INTEGER): exact, and summable by SQLite without floats. Timestamps are ISO-8601 UTC text.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


def migrate(db: sqlite3.Connection, migrations: list[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations this database lacks, in order; return the names applied.

    `db` must be in autocommit mode (`isolation_level=None`) so that each migration's transaction,
    DDL included, is the explicit one here.
    """
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {name for (name,) in db.execute("SELECT name FROM _migrations")}
    applied = []
    for fn in migrations:
        if fn.__name__ in done:
            continue  # without taking the write lock: a reader of a current ledger never waits on the proxy
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,)).fetchone():
                db.execute("ROLLBACK")
                continue
            fn(db)
            db.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ'))",
                (fn.__name__,),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(fn.__name__)
    return applied


@migration
def m001_runs_and_calls(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            name TEXT,
            command TEXT NOT NULL,
            cwd TEXT NOT NULL,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            budget TEXT NOT NULL,
            status TEXT NOT NULL,
            halt_reason TEXT,
            exit_status INTEGER,
            tags TEXT NOT NULL DEFAULT '{}',
            owner TEXT,
            calls INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            cached_input_tokens INTEGER NOT NULL DEFAULT 0,
            cache_write_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            cost_pusd INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    db.execute("CREATE INDEX runs_started_at ON runs (started_at)")
    db.execute(
        """
        CREATE TABLE calls (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            provider TEXT NOT NULL,
            requested_model TEXT,
            model TEXT,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            cache_write_1h_tokens INTEGER NOT NULL,
            input_audio_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            output_audio_tokens INTEGER NOT NULL,
            web_searches INTEGER NOT NULL,
            cost_pusd INTEGER NOT NULL,
            price_source TEXT,
            flags TEXT NOT NULL,
            latency_ms REAL NOT NULL,
            ttfb_ms REAL,
            error TEXT,
            PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID
        """
    )


@migration
def m002_cache_savings(db: sqlite3.Connection) -> None:
    """What each call's cache reads saved over paying the plain input rate (0 for calls recorded before)."""
    db.execute("ALTER TABLE calls ADD COLUMN cache_savings_pusd INTEGER NOT NULL DEFAULT 0")


@migration
def m003_call_rollups(db: sqlite3.Connection) -> None:
    """A run's counted calls summed per UTC day and model, so that `rk ledger summary` reads thousands of
    rollups rather than millions of calls. Triggers keep them: written when a run ends (whichever rk ends
    it, or a reader marking it interrupted), dropped when a run is taken up again (a running run's calls are
    read directly). Backfilled here for the runs already ended."""
    db.execute(
        """
        CREATE TABLE call_rollups (
            run_id TEXT NOT NULL,
            day TEXT NOT NULL,
            model TEXT NOT NULL,
            calls INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            cost_pusd INTEGER NOT NULL,
            PRIMARY KEY (run_id, day, model)
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX call_rollups_day ON call_rollups (day)")
    rollup = """
        INSERT INTO call_rollups
        SELECT run_id, substr(started_at, 1, 10), coalesce(model, requested_model, '?'), count(*),
               sum(input_tokens), sum(cached_input_tokens), sum(cache_write_tokens), sum(output_tokens),
               sum(reasoning_tokens), sum(cost_pusd)
        FROM calls
        WHERE instr(flags, 'refused') = 0 AND instr(flags, 'unmetered') = 0 AND run_id {}
        GROUP BY 1, 2, 3
    """
    db.execute(
        f"""
        CREATE TRIGGER call_rollups_on_end AFTER UPDATE OF status ON runs
        WHEN NEW.status != 'running' AND OLD.status = 'running'
        BEGIN
            DELETE FROM call_rollups WHERE run_id = NEW.id;
            {rollup.format("= NEW.id")};
        END
        """
    )
    db.execute(
        """
        CREATE TRIGGER call_rollups_on_resume AFTER UPDATE OF status ON runs
        WHEN NEW.status = 'running' AND OLD.status != 'running'
        BEGIN
            DELETE FROM call_rollups WHERE run_id = NEW.id;
        END
        """
    )
    db.execute(rollup.format("IN (SELECT id FROM runs WHERE status != 'running')"))


@migration
def m004_reservations(db: sqlite3.Connection) -> None:
    """The worst case each metered call was admitted or refused against, and the output limit rk set on it
    under --strict, so that a refusal or a clamp can be explained from the ledger (NULL for calls before)."""
    db.execute("ALTER TABLE calls ADD COLUMN reserved_pusd INTEGER")
    db.execute("ALTER TABLE calls ADD COLUMN output_limit INTEGER")


@migration
def m005_unended_runs(db: sqlite3.Connection) -> None:
    """The runs not yet ended, found without reading every run: each reader looks for those whose owner died,
    and `rk serve` does on every run it is asked for the first time."""
    db.execute("CREATE INDEX runs_running ON runs (owner) WHERE status = 'running'")
