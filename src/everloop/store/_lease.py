"""Leases in the metadata store: one holder at a time for work that must not run twice (the loop).

A lease is one row of the `leases` table: its name, the holder (host and pid, for people), a token
that grows by one at every acquisition (the holder's identity, and a fencing token), when it was
taken and when it expires. `Lease.acquire` takes the row when it is free or expired, in one
conditional UPDATE, and starts a heartbeat thread that pushes the expiry `ttl` seconds ahead every
`ttl / 3` seconds, so that a live holder keeps its lease through a retraining of any length. A
holder that was killed frees its lease when the TTL runs out; sooner when it ran on this machine
(same kernel boot and pid namespace, recorded in `process`) and its pid is gone: the next turn on
the same machine need not wait for a process that provably no longer exists.
Whatever writes on the holder's behalf checks the lease in its own transaction (`Lease.check`):
a holder that lost the lease (stalled past its TTL, cut from the database) moves nothing.

Why a lease row and not a PostgreSQL advisory lock plus SQLite's own locking:

- kill -9: an advisory lock lives as long as the database session. A killed process's socket is
  closed and the server lets go; but a machine that vanishes (power cut, a partitioned network, a
  pod evicted with its node) leaves the server holding the lock until TCP keepalive gives up, by
  default about two hours, and a pooler in transaction mode (PgBouncer) breaks session locks
  outright. A lease row is released by time, whatever happened to its holder: after `ttl` seconds.
- SQLite has no advisory lock, and its write lock held for a whole retraining would stall every
  other writer, the service's prediction log among them. One row works the same on both.
- A stalled holder: an advisory lock cannot tell its holder it was lost. The lease's token fences
  it: the alias move re-checks holder and token in its own transaction.

Times are the database's clock (`db_now`), not each machine's: two machines sharing PostgreSQL
with skewed clocks still agree on when a lease expires.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from everloop.errors import EverloopError, StoreError
from everloop.store import _meta

LEASE_TTL = 60.0  # seconds a lease outlives its last renewal: how long a crashed holder blocks the next


class LeaseBusy(EverloopError):
    """Another holder has the lease: `.holder` (host and pid), `.since` and `.expires_at` (epoch seconds)."""

    def __init__(self, name: str, holder: str, since: float, expires_at: float):
        self.name, self.holder, self.since, self.expires_at = name, holder, since, expires_at
        super().__init__(f"lease {name!r} is held by {holder} since {when(since)}")


class LeaseLost(StoreError):
    """The lease expired and may have been taken by another holder: nothing may be written for it."""


class Lease:
    """A held lease; build it with `Lease.acquire`. Use as a context manager: the heartbeat stops and
    the lease is released at the end of the block (a crashed holder's lease expires instead)."""

    def __init__(self, engine: sa.Engine, name: str, token: int, holder: str, ttl: float):
        self.engine, self.name, self.token, self.holder, self.ttl = engine, name, token, holder, ttl
        self.lost = False  # set by the heartbeat when a renewal found the lease gone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"everloop-lease-{name}", daemon=True)

    @classmethod
    def acquire(cls, engine: sa.Engine, name: str, *, ttl: float = LEASE_TTL) -> "Lease":
        """Take lease `name` for `ttl` seconds (renewed while held) if nobody holds it or its holder's
        lease expired. Raises LeaseBusy naming the holder otherwise."""
        t = _meta.leases
        holder = f"{socket.gethostname()} pid {os.getpid()}"
        try:  # the row exists once per name, free (expired) until first taken
            with engine.begin() as conn:
                conn.execute(t.insert().values(name=name, holder="", process="", token=0, acquired_at=0.0,
                                               expires_at=0.0))
        except sa.exc.IntegrityError:
            pass
        with engine.begin() as conn:
            now = db_now(conn)
            free = t.c.expires_at <= now
            row = current(conn, name)
            if row["expires_at"] > now and _dead(row["process"]):
                free = free | (t.c.token == row["token"])  # its holder is gone: no need to wait out the TTL
            # one conditional UPDATE: PostgreSQL re-checks the WHERE on the row a concurrent winner
            # committed, SQLite runs one writer at a time, so exactly one contender matches
            taken = conn.execute(t.update().where(t.c.name == name, free)
                                 .values(holder=holder, process=_this_process(), token=t.c.token + 1,
                                         acquired_at=now, expires_at=now + ttl)
                                 .returning(t.c.token)).scalar()
        if taken is None:
            row = current(engine, name)
            raise LeaseBusy(name, row["holder"], row["acquired_at"], row["expires_at"])
        lease = cls(engine, name, taken, holder, ttl)
        lease._thread.start()
        return lease

    def renew(self, conn: sa.Connection | None = None) -> bool:
        """Push the expiry `ttl` seconds ahead if this holder still has the lease; False if it lost it.
        With `conn`, inside that transaction (on PostgreSQL the row stays locked until it commits)."""
        if conn is None:
            with self.engine.begin() as conn:
                return self.renew(conn)
        t = _meta.leases
        now = db_now(conn)
        done = conn.execute(t.update().where(t.c.name == self.name, t.c.token == self.token, t.c.expires_at > now)
                            .values(expires_at=now + self.ttl))
        return done.rowcount == 1

    def check(self, conn: sa.Connection) -> None:
        """Raise LeaseLost unless this holder still has the lease; call it in the transaction of a write
        made for the lease, so that the write commits only while the lease is held."""
        if self.lost or not self.renew(conn):
            self.lost = True
            row = current(conn, self.name)
            taken = "" if row.get("token") == self.token else f"; {row['holder']} took it at {when(row['acquired_at'])}"
            raise LeaseLost(f"this process lost the {self.name} lease (not renewed for {self.ttl:g} s{taken}): "
                            "this write was not made")

    def release(self) -> None:
        """Stop the heartbeat and free the lease (only if this holder still has it)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        t = _meta.leases
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.name == self.name, t.c.token == self.token)
                         .values(expires_at=db_now(conn)))

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    self.lost = True
                    return
            except sa.exc.SQLAlchemyError:  # the database is away for now: try again; `check` decides
                continue


def current(bind: sa.Engine | sa.Connection, name: str) -> dict[str, Any]:
    """The lease row `name` (holder, token, acquired_at, expires_at), or {} when never taken."""
    t = _meta.leases
    query = sa.select(t).where(t.c.name == name)
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            row = conn.execute(query).first()
    else:
        row = bind.execute(query).first()
    return dict(row._mapping) if row else {}


def db_now(bind: sa.Engine | sa.Connection) -> float:
    """The database server's clock, in epoch seconds (this machine's clock for other databases)."""
    name = bind.dialect.name
    if name == "postgresql":
        query = sa.text("SELECT CAST(extract(epoch FROM clock_timestamp()) AS double precision)")
    elif name == "sqlite":
        query = sa.text("SELECT (julianday('now') - 2440587.5) * 86400.0")
    else:
        return time.time()
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return float(conn.execute(query).scalar())
    return float(bind.execute(query).scalar())


def _this_process() -> str:
    """'<boot id> <pid namespace> <pid>': this process, unique on one running kernel; '' where that cannot
    be read (not Linux), and then only the TTL frees a dead holder's lease."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')} {os.getpid()}"
    except OSError:
        return ""


def _dead(process: str) -> bool:
    """True only when `process` ran under this kernel boot and pid namespace and its pid is gone. Another
    machine or container, a pid reused since, or no way to tell: False (wait for the TTL)."""
    mine = _this_process()
    where, _, pid = process.rpartition(" ")
    if not mine or not where or where != mine.rpartition(" ")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive, another user's; or no such pid could exist
        return False
    return False


def when(epoch: float) -> str:
    """Epoch seconds as 'YYYY-MM-DD HH:MM:SS UTC'."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
