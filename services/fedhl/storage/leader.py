"""Leader election over the database: a Postgres session-level advisory lock held on a
dedicated connection, released by the server when the holder's process dies. SQLite is
single-process, so there the caller is always the leader. This is the only SQL outside the
repositories: it locks a connection rather than reading or writing rows."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, text

SCHEDULER_LOCK_ID = 0x46454448  # "FEDH": the lock the scheduler leader holds


class LeaderLock:
    def __init__(self, engine: Engine, lock_id: int = SCHEDULER_LOCK_ID) -> None:
        self.engine = engine
        self.lock_id = lock_id
        self.conn: Connection | None = None

    def acquire(self) -> bool:
        """True once this process holds the lock (non-blocking; call again to retry)."""
        if self.engine.dialect.name != "postgresql":
            return True
        if self.conn is None:
            self.conn = self.engine.connect()
        try:
            got = bool(self.conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.lock_id}).scalar())
            self.conn.commit()
            if got:
                return True
            self.conn.close()
            self.conn = None
            return False
        except Exception:
            self.conn = None
            raise

    def release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.lock_id})
                self.conn.commit()
            finally:
                self.conn.close()
                self.conn = None
