"""Leader election over the database: a Postgres session-level advisory lock held on a
dedicated connection, released by the server when the holder's process dies, and also when
the database restarts or the connection drops: `held()` checks that, so a leader notices the
loss on its next tick and steps down until it acquires the lock again. SQLite is
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
        if self.conn is not None:
            return self.held()  # re-locking would stack a second hold on the same session
        self.conn = self.engine.connect()
        try:
            got = bool(self.conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.lock_id}).scalar())
            self.conn.commit()
            if got:
                return True
            self._drop()
            return False
        except Exception:
            self._drop()
            raise

    def held(self) -> bool:
        """Whether this process still holds the lock, asked of the server on the lock's own
        connection (a dropped connection means the lock is gone). A failed check releases
        the connection: the caller is no longer the leader."""
        if self.engine.dialect.name != "postgresql":
            return True
        if self.conn is None:
            return False
        try:
            n = self.conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = :k"
                ),
                {"k": self.lock_id},
            ).scalar()
            self.conn.commit()
        except Exception:
            self._drop()
            return False
        if not n:
            self._drop()
            return False
        return True

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never hand a broken or lock-holding connection back to the pool
                conn.close()
            except Exception:
                pass

    def release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.lock_id})
                self.conn.commit()
            except Exception:
                pass  # the connection is gone, and the lock with it
            finally:
                self._drop()
