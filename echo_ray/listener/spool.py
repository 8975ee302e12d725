"""The spool folder of `echo-ray listen`: the instances it received, written durably, and
its ledger (SQLite in WAL mode, standard library only), one row per study.

Layout:

    SPOOL/ledger.sqlite (+ -wal, -shm)     the ledger: tables `studies` and `files`
    SPOOL/studies/<StudyInstanceUID>/<SOPInstanceUID>.dcm   each instance as it was sent
    SPOOL/sr/<StudyInstanceUID>.dcm        the Structured Report of each reported study
    SPOOL/tmp/                             writes in progress (emptied at start)
    SPOOL/lock                             held (flock) by the one node using the spool

A UID that is not a plain UID (digits and dots, at most 64 characters) is named by a hash
instead (`h<sha256[:32]>`), so no received value ever becomes a path of its own making.

A study's `state`:

    receiving   files arrive; reported once none has arrived for the quiet period
    reported    its SR is written (`sr_file`, `sr_sop_instance_uid`), not yet sent
    sent        the destination acknowledged the SR: never reported again
    error       no report (`reason`, `message`): the study cannot be reported as it is

Rules (exactly once across restarts, docs/ARCHITECTURE.md "The DICOM node"):

- `store` writes the file (temporary file, fsync, rename, fsync of the folder) and then
  commits its ledger row (`synchronous=FULL`) before the C-STORE is answered: an
  acknowledged instance is on disk and in the ledger.
- A new file re-arms a `receiving` study's quiet period and an `error` study (a missing
  frontal view may just have arrived); for a `reported` or `sent` study it is a late file,
  kept and counted (`late_files`), never reported again.
- `mark_reported` / `mark_error` apply only when no file arrived while the study was being
  reported (its `last_arrival` unchanged); otherwise the study stays `receiving` and is
  reported again, whole, after its quiet period.
- At start (`rearm`), `receiving` studies count their quiet period from now; `reported`
  studies are sent again (the same SR file; its UID is deterministic, so a destination
  that already has it keeps one copy).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

LEDGER = "ledger.sqlite"
LOCK = "lock"
STUDIES_DIR = "studies"
SR_DIR = "sr"
TMP_DIR = "tmp"
STATES = ("receiving", "reported", "sent", "error")
# Seconds before a failed send is tried again: doubles from the first, up to the last.
SEND_RETRY_S = (5.0, 300.0)

_PLAIN_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    state TEXT NOT NULL,
    num_files INTEGER NOT NULL DEFAULT 0,
    late_files INTEGER NOT NULL DEFAULT 0,
    first_arrival REAL NOT NULL,
    last_arrival REAL NOT NULL,
    reason TEXT,
    message TEXT,
    sr_sop_instance_uid TEXT,
    sr_file TEXT,
    reported_at TEXT,
    sent_at TEXT,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    next_send_at REAL
);
CREATE TABLE IF NOT EXISTS files (
    study_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT,
    PRIMARY KEY (study_uid, sop_instance_uid)
);
"""


def safe_name(uid: str) -> str:
    """A file or folder name for a UID: itself when it is a plain UID, else a hash."""
    uid = uid.strip()
    if _PLAIN_UID.match(uid):
        return uid
    return "h" + hashlib.sha256(uid.encode()).hexdigest()[:32]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_durably(path: str, data: bytes, tmp_dir: str) -> None:
    """`data` at `path`, all or nothing: a temporary file in `tmp_dir` (same filesystem),
    fsync, rename over `path`, fsync of `path`'s folder."""
    tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolInUse(RuntimeError):
    """Another process holds the spool."""


@dataclass(frozen=True)
class DueStudy:
    """A study whose quiet period has passed: its files as the ledger had them."""

    study_uid: str
    last_arrival: float  # the stamp `mark_reported` / `mark_error` check
    files: list[str]  # paths, in arrival order


class Spool:
    """The spool folder and its ledger; every method is thread-safe (one connection, one
    lock: the association threads store, the reporting thread reads and marks)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        for sub in (STUDIES_DIR, SR_DIR):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        # One node per spool: two would report the same studies. The kernel drops the lock
        # when the process dies, however it dies.
        self._lock_file = open(os.path.join(self.root, LOCK), "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolInUse(f"{self.root} is the spool of another running echo-ray "
                             "listen") from None
        self.tmp = os.path.join(self.root, TMP_DIR)
        shutil.rmtree(self.tmp, ignore_errors=True)  # partial writes of a killed run
        os.makedirs(self.tmp)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.root, LEDGER), check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def store(self, study_uid: str, sop_instance_uid: str | None, data: bytes, *,
              calling_ae: str | None = None) -> tuple[str, int]:
        """Write one received instance durably and record it (module docstring).

        Returns:
            (what the file was to its study: "new" (a study's first file), "added",
            "rearmed" (an error study got a file), "late" (its study is reported or sent);
            the study's number of files).

        Raises:
            OSError: the file could not be written (nothing is recorded then).
        """
        folder = safe_name(study_uid)
        name = safe_name(sop_instance_uid) if sop_instance_uid else \
            "h" + hashlib.sha256(data).hexdigest()[:32]
        os.makedirs(os.path.join(self.root, STUDIES_DIR, folder), exist_ok=True)
        rel = os.path.join(STUDIES_DIR, folder, f"{name}.dcm")
        write_durably(os.path.join(self.root, rel), data, self.tmp)
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT state FROM studies WHERE study_uid = ?",
                             (study_uid,)).fetchone()
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                       (study_uid, sop_instance_uid or name, rel, len(data), now, calling_ae))
            (count,) = db.execute("SELECT COUNT(*) FROM files WHERE study_uid = ?",
                                  (study_uid,)).fetchone()
            if row is None:
                db.execute("INSERT INTO studies (study_uid, folder, state, num_files, "
                           "first_arrival, last_arrival) VALUES (?, ?, 'receiving', ?, ?, ?)",
                           (study_uid, folder, count, now, now))
                return "new", count
            state = row[0]
            if state in ("reported", "sent"):
                db.execute("UPDATE studies SET late_files = late_files + 1, num_files = ? "
                           "WHERE study_uid = ?", (count, study_uid))
                return "late", count
            db.execute("UPDATE studies SET state = 'receiving', last_arrival = ?, "
                       "num_files = ?, reason = NULL, message = NULL WHERE study_uid = ?",
                       (now, count, study_uid))
            return ("rearmed" if state == "error" else "added"), count

    def rearm(self) -> dict[str, int]:
        """At start: `receiving` studies count their quiet period from now. Returns the
        number of studies in each state."""
        with self._transaction() as db:
            db.execute("UPDATE studies SET last_arrival = ? WHERE state = 'receiving'",
                       (time.time(),))
            db.execute("UPDATE studies SET next_send_at = NULL WHERE state = 'reported'")
        return self.counts()

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state")
            found = dict(rows.fetchall())
        return {state: found.get(state, 0) for state in STATES}

    def due(self, quiet_s: float, limit: int) -> list[DueStudy]:
        """Up to `limit` `receiving` studies with no file for `quiet_s` seconds, the
        longest quiet first."""
        with self._lock:
            studies = self._db.execute(
                "SELECT study_uid, last_arrival FROM studies WHERE state = 'receiving' AND "
                "last_arrival <= ? ORDER BY last_arrival LIMIT ?",
                (time.time() - quiet_s, limit)).fetchall()
            out = []
            for uid, stamp in studies:
                files = self._db.execute(
                    "SELECT path FROM files WHERE study_uid = ? ORDER BY received_at, path",
                    (uid,)).fetchall()
                out.append(DueStudy(uid, stamp, [os.path.join(self.root, p) for (p,) in files]))
        return out

    def _mark(self, study: DueStudy, sets: str, values: tuple) -> bool:
        with self._transaction() as db:
            done = db.execute(f"UPDATE studies SET {sets} WHERE study_uid = ? AND "  # noqa: S608
                              "state = 'receiving' AND last_arrival = ?",
                              (*values, study.study_uid, study.last_arrival))
            return done.rowcount == 1

    def mark_reported(self, study: DueStudy, sr_sop_instance_uid: str, sr_file: str) -> bool:
        """`receiving` -> `reported`; False (nothing changed) when a file arrived since
        `due` gave the study (it is reported again after its quiet period)."""
        return self._mark(study, "state = 'reported', sr_sop_instance_uid = ?, sr_file = ?, "
                          "reported_at = ?, reason = NULL, message = NULL",
                          (sr_sop_instance_uid, os.path.relpath(sr_file, self.root),
                           _now_iso()))

    def mark_error(self, study: DueStudy, reason: str, message: str) -> bool:
        """`receiving` -> `error` with the reason; False as `mark_reported`."""
        return self._mark(study, "state = 'error', reason = ?, message = ?, reported_at = ?",
                          (reason, message, _now_iso()))

    def to_send(self) -> list[tuple[str, str]]:
        """(study_uid, SR path) of the `reported` studies whose send is due."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid, sr_file FROM studies WHERE state = 'reported' AND "
                "(next_send_at IS NULL OR next_send_at <= ?) ORDER BY reported_at",
                (time.time(),)).fetchall()
        return [(uid, os.path.join(self.root, path)) for uid, path in rows]

    def mark_sent(self, study_uid: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE studies SET state = 'sent', sent_at = ?, send_attempts = "
                       "send_attempts + 1, next_send_at = NULL, reason = NULL, message = NULL "
                       "WHERE study_uid = ? AND state = 'reported'", (_now_iso(), study_uid))

    def mark_send_failed(self, study_uid: str, message: str) -> float:
        """Record a failed send (`reason` send_failed); returns the seconds until the next
        try."""
        with self._transaction() as db:
            (attempts,) = db.execute("SELECT send_attempts FROM studies WHERE study_uid = ?",
                                     (study_uid,)).fetchone()
            wait = min(SEND_RETRY_S[1], SEND_RETRY_S[0] * 2 ** attempts)
            db.execute("UPDATE studies SET send_attempts = ?, next_send_at = ?, "
                       "reason = 'send_failed', message = ? WHERE study_uid = ?",
                       (attempts + 1, time.time() + wait, message, study_uid))
        return wait

    def study(self, study_uid: str) -> dict | None:
        """The ledger row of one study, as a dict (None when unknown)."""
        with self._lock:
            cursor = self._db.execute("SELECT * FROM studies WHERE study_uid = ?",
                                      (study_uid,))
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        return dict(zip(names, row, strict=True)) if row else None

    def sr_path(self, study_uid: str) -> str:
        return os.path.join(self.root, SR_DIR, f"{safe_name(study_uid)}.dcm")
