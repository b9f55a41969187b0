"""Crash a two-phase commit for real: SIGKILL a coordinator or a shard server mid-protocol.

Three pieces, used by ``scripts/kill_matrix.py``, ``tests/test_crash_recovery.py``
and the two-phase-commit notebook:

* **a coordinator process** (``python -m shardlib.crashlab --point P --shards
  asia,europe --tag T``): one ``twophase=True`` session inserts one location
  per shard (cities ``T-<shard>``) and commits. At the named protocol point
  it prints ``AT <point> <shard>`` and waits for a line on stdin, so another
  process can kill it (or a server) exactly there;
* :class:`Servers`: the servers ``scripts/pg.sh`` runs (``kill9`` sends SIGKILL
  to a postmaster and all its backends, ``start`` restarts it: WAL crash
  recovery, prepared transactions included);
* :func:`crash_case`: one cell of the kill matrix, i.e. start a coordinator,
  kill someone at a point, restart, ``recover()``, and check that the outcome is
  atomic, nothing is left prepared, no lock is held, and a fresh session sees it.

Kill points (``KILL_POINTS``), in protocol order:

======================  ==================================================
``before_prepare``      rows written on every shard, no PREPARE yet
``after_some_prepares`` the first shard PREPAREd, the others not
``after_all_prepares``  every shard PREPAREd, the decision not yet logged
``after_logged``        the decision logged, no COMMIT PREPARED yet
``after_some_commits``  the first shard committed, the others prepared
======================  ==================================================
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

KILL_POINTS: tuple[str, ...] = (
    "before_prepare", "after_some_prepares", "after_all_prepares", "after_logged", "after_some_commits",
)
"""Where a coordinator can be stopped and killed, in protocol order."""

COMMITTED_AFTER = "after_logged"
"""From this point on the decision is logged: a crash must end in a commit."""

APPLICATION_NAME = "shardlib-crashlab-coordinator"
"""The coordinator's connections carry this name (pg_stat_activity.application_name)."""

CONTINENT_OF = {"north_america": "North America", "asia": "Asia", "europe": "Europe",
                "south_america": "South America"}


def _matches(point: str, protocol_point: str, details: Mapping[str, Any]) -> bool:
    done = details.get("done", 0)
    return {
        "before_prepare": protocol_point == "prepare" and done == 0,
        "after_some_prepares": protocol_point == "prepare" and done == 1,
        "after_all_prepares": protocol_point == "decide",
        "after_logged": protocol_point == "logged",
        "after_some_commits": protocol_point == "commit" and done == 1,
    }[point]


# ------------------------------------------------------------- the coordinator process

async def _coordinate(point: str | None, shards: Sequence[str], tag: str) -> None:
    import shardlib
    from shardlib import WeatherLocation, twophase

    engines = shardlib.make_engines(connect_args={"server_settings": {"application_name": APPLICATION_NAME}})
    Session = shardlib.make_sessionmaker(engines, twophase=True)

    def observer(protocol_point: str, details: dict[str, Any]) -> None:
        if point is not None and _matches(point, protocol_point, details):
            victim = details.get("shard") or next(iter(details["participants"]))
            print(f"AT {point} {victim}", flush=True)
            sys.stdin.readline()  # wait: the parent kills us, or a server, then says go

    try:
        with twophase.watch(observer):
            async with Session() as session:
                session.add_all([WeatherLocation(CONTINENT_OF[s], f"{tag}-{s}") for s in shards])
                await session.commit()
        print("DONE committed", flush=True)
    except Exception as error:
        print(f"DONE failed {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
    finally:
        await shardlib.dispose(engines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a twophase=True coordinator that stops at a protocol point")
    parser.add_argument("--point", choices=KILL_POINTS, default=None)
    parser.add_argument("--shards", default="asia,europe")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_coordinate(args.point, args.shards.split(","), args.tag))


class Coordinator:
    """A coordinator subprocess, stopped at ``point`` (``None``: runs to the end)."""

    def __init__(self, point: str | None, shards: Sequence[str], tag: str) -> None:
        command = [sys.executable, "-m", "shardlib.crashlab", "--shards", ",".join(shards), "--tag", tag]
        if point is not None:
            command += ["--point", point]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.point = point

    def wait_at_point(self) -> str:
        """Block until the coordinator reaches its point; return the shard it is about to touch."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("AT "):
            self.process.wait()
            raise RuntimeError(f"coordinator did not reach {self.point!r}: {line!r} "
                               f"{self.process.stderr.read() if self.process.stderr else ''}")
        return line.split()[2]

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the coordinator."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def go_on(self, timeout: float = 120.0) -> str:
        """Let it continue from its point; return its last line (``DONE ...``)."""
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        out, err = self.process.communicate(timeout=timeout)
        return (out.strip().splitlines() or [err.strip()[-300:]])[-1]


# ------------------------------------------------------------- the servers

PG_SH = Path(__file__).resolve().parent.parent / "scripts" / "pg.sh"


class Servers:
    """The servers behind ``urls``, if ``scripts/pg.sh`` runs them here (else :meth:`find` is None)."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = dict(names)  # shard -> pg.sh server name

    @classmethod
    def find(cls, urls: Mapping[str, str]) -> Servers | None:
        pg_dir = PG_SH.parent.parent / ".pg"
        names = {}
        for shard, url in urls.items():
            port_file = pg_dir / shard / "port"
            parsed = make_url(url)
            if (not PG_SH.exists() or not port_file.exists() or parsed.host not in ("127.0.0.1", "localhost")
                    or port_file.read_text().strip() != str(parsed.port)):
                return None
            names[shard] = shard
        return cls(names)

    def _run(self, command: str, shard: str) -> None:
        subprocess.run(["bash", str(PG_SH), command, self.names[shard]], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill9(self, shard: str) -> None:
        """SIGKILL the shard's postmaster and every backend (a crash: no checkpoint, no goodbye)."""
        self._run("kill9", shard)

    def stop(self, shard: str) -> None:
        """Stop the shard's server cleanly (an outage that is not a crash)."""
        self._run("stop", shard)

    def pause(self, shard: str, backends: bool = False) -> list[int]:
        """SIGSTOP the postmaster (and, with ``backends``, every backend): the kernel still
        accepts TCP connections, the server never answers. Returns the pids for :meth:`resume`."""
        pid = int((PG_SH.parent.parent / ".pg" / self.names[shard] / "data" / "postmaster.pid").read_text().split()[0])
        pids = [pid]
        if backends:
            found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            pids += [int(p) for p in found]
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        return pids

    @staticmethod
    def resume(pids: list[int]) -> None:
        """SIGCONT what :meth:`pause` stopped."""
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def start(self, shard: str) -> None:
        """Start it again: PostgreSQL replays its WAL, prepared transactions included."""
        self._run("start", shard)


# ------------------------------------------------------------- one cell of the matrix

@dataclass
class Outcome:
    """What a crash left, after restart and ``recover()``."""

    point: str
    shards: int
    died: str
    coordinator_said: str
    rows_per_shard: dict[str, int]
    prepared_left: int
    locks_free: bool
    fresh_session_rows: int
    recover_actions: list[str]

    @property
    def outcome(self) -> str:
        counts = set(self.rows_per_shard.values())
        if counts == {1}:
            return "committed on all"
        if counts == {0}:
            return "rolled back on all"
        return "MIXED: " + ", ".join(f"{s}={n}" for s, n in self.rows_per_shard.items())

    @property
    def atomic(self) -> bool:
        return (not self.outcome.startswith("MIXED") and self.prepared_left == 0
                and self.locks_free and self.fresh_session_rows == sum(self.rows_per_shard.values()))

    def row(self) -> dict[str, Any]:
        return {"kill point": self.point, "shards": self.shards, "who died": self.died,
                "coordinator": self.coordinator_said, "recover()": "; ".join(self.recover_actions) or "nothing",
                "outcome": self.outcome, "prepared left": self.prepared_left,
                "locks free": self.locks_free, "atomic": self.atomic}


async def _wait_for_coordinator_backends(engines: Mapping[str, Any]) -> None:
    """A killed client's backends end when they notice the closed socket: wait for that."""
    for engine in engines.values():
        async with engine.connect() as conn:
            for _ in range(200):
                n = (await conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"), {"a": APPLICATION_NAME})).scalar_one()
                if n == 0:
                    break
                await asyncio.sleep(0.05)


async def inspect_outcome(urls: Mapping[str, str], engines: Mapping[str, Any], shards: Sequence[str],
                          tag: str) -> dict[str, Any]:
    """Rows of ``tag`` per shard, prepared transactions left, and whether every table lock is free."""
    import shardlib
    from shardlib import Report, WeatherLocation

    await _wait_for_coordinator_backends(engines)
    rows, prepared, locks_free = {}, 0, True
    for shard, engine in engines.items():
        async with engine.connect() as conn:
            prepared += (await conn.execute(text(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"))).scalar_one()
            if shard in shards:
                rows[shard] = (await conn.execute(
                    select(func.count()).where(WeatherLocation.city == f"{tag}-{shard}"))).scalar_one()
            tables = f"{WeatherLocation.__tablename__}, {Report.__tablename__}"
            try:  # conflicts with every lock a transaction (prepared or not) holds on the tables
                await conn.execute(text(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE NOWAIT"))
            except DBAPIError as error:
                if getattr(error.orig, "sqlstate", None) != "55P03":  # lock_not_available
                    raise
                locks_free = False
            await conn.rollback()
    fresh_engines = shardlib.make_engines(dict(urls))
    try:
        async with shardlib.make_sessionmaker(fresh_engines)() as session:
            fresh = len((await session.execute(select(WeatherLocation).where(
                WeatherLocation.city.in_([f"{tag}-{s}" for s in shards])))).scalars().all())
    finally:
        await shardlib.dispose(fresh_engines)
    return {"rows": rows, "prepared": prepared, "locks_free": locks_free, "fresh": fresh}


async def crash_case(urls: Mapping[str, str], servers: Servers | None, point: str, shards: Sequence[str],
                     died: str, tag: str, recover: Any = None) -> Outcome:
    """Run one coordinator to ``point``, kill ``died``, restart, recover, and report.

    ``died`` is ``"coordinator"`` (SIGKILL the coordinator process),
    ``"participant"`` (SIGKILL the server of the shard the coordinator is about
    to touch, let the coordinator go on, restart the server) or a shard id
    (that shard's server, e.g. the commit log's). ``recover`` replaces
    :func:`shardlib.recover` (to prove the tests bite).
    """
    import shardlib

    coordinator = Coordinator(point, shards, tag)
    try:
        next_shard = await asyncio.to_thread(coordinator.wait_at_point)
        if died == "coordinator":
            coordinator.kill()
            said = "killed"
        else:
            victim = next_shard if died == "participant" else died
            if servers is None:
                raise RuntimeError("killing a server needs the servers of scripts/pg.sh (make pg-up)")
            await asyncio.to_thread(servers.kill9, victim)
            said = await asyncio.to_thread(coordinator.go_on)
            await asyncio.to_thread(servers.start, victim)
            died = f"server {victim}"
    finally:
        if coordinator.process.poll() is None:
            coordinator.process.kill()
            coordinator.process.wait()

    engines = shardlib.make_engines(dict(urls))
    try:
        done = await (recover or shardlib.recover)(engines, min_age=0)
        acted = [f"{r.shard}: {r.action}" for r in done.itertuples() if r.xid is not None]
        seen = await inspect_outcome(urls, engines, shards, tag)
    finally:
        await shardlib.dispose(engines)
    return Outcome(point, len(shards), died, said.removeprefix("DONE "), seen["rows"], seen["prepared"],
                   seen["locks_free"], seen["fresh"], acted)


if __name__ == "__main__":
    main()
