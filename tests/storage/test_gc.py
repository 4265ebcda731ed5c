"""Blob garbage collection keeps everything the tables reference (the job's state, open
rounds, the last K checkpoints and their rounds) and every young blob, deletes the rest and
stale partial uploads, on the file and S3 stores and both databases; `--dry-run` deletes
nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dbunit import sessions, unit_database
from fedhl.storage.blobs import BlobStore, FileBlobStore
from fedhl.storage.db import migrate, transaction
from fedhl.storage.gc import Retention, collect
from fedhl.storage.models import Agent, Assignment, Job, JobStatus, Round, RoundShard, RoundState, Update, utcnow
from fedhl.storage.repos import CheckpointRepo

__all__ = ["sessions", "unit_database"]

LATER = lambda: time.time() + 10  # noqa: E731  (every blob is past a 5 s grace)


def populate(s: Session, blobs: BlobStore) -> tuple[set[str], set[str]]:
    """A job at version 3 (rounds 0-2 committed, round 3 collecting): returns (keys that must
    be kept with keep_checkpoints=1, keys that may go)."""
    put = lambda tag: blobs.put_bytes(tag.encode())  # noqa: E731
    job = Job(
        id="j1", name="j", status=JobStatus.RUNNING, strategy="fedhl", base_model="none", config={}, current_round=3
    )
    job.state_key, job.plan_key, job.start_keys = put("state3"), put("plan3"), {"4": put("start3")}
    s.add(job)
    s.add(Agent(id="a1", credential_hash="x"))
    s.flush()
    keep = {job.state_key, job.plan_key, put("start3")}
    drop: set[str] = set()
    for n in range(4):
        open_ = n == 3
        r = Round(
            job_id="j1",
            number=n,
            state=RoundState.COLLECTING if open_ else RoundState.COMMITTED,
            deadline=utcnow() + timedelta(hours=1),
            target=1,
            quorum=1,
            input_state_key=put(f"state{n}"),
            start_keys={"4": put(f"start{n}")},
        )
        s.add(r)
        s.flush()
        a = Assignment(round_id=r.id, agent_id="a1", rank=4)
        s.add(a)
        s.flush()
        up = put(f"update{n}")
        s.add(Update(assignment_id=a.id, round_id=r.id, agent_id="a1", blob_key=up, sha256=up, size=1, n_examples=1))
        round_keys = {r.input_state_key, up, put(f"start{n}")}
        if not open_:
            shard = put(f"shard{n}")
            s.add(RoundShard(round_id=r.id, shard=0, blob_key=shard))
            round_keys.add(shard)
            CheckpointRepo(s).add("j1", n + 1, put(f"state{n + 1}"))
        # kept: the open round 3 and the last round (2) with its checkpoint (version 3)
        (keep if n >= 2 else drop).update(round_keys)
    drop -= keep  # state1/state2 are both a checkpoint and a later round's input
    return keep, drop


def test_gc_deletes_only_unreferenced_blobs(sessions: sessionmaker[Session], blob_store: BlobStore) -> None:
    with transaction(sessions) as s:
        keep, drop = populate(s, blob_store)
    stray = blob_store.put_bytes(b"written by a crashed process")
    retention = Retention(keep_checkpoints=1, min_age_s=5, staging_max_age_s=5)

    young = collect(sessions, blob_store, retention)  # nothing is 5 s old yet
    assert young.deleted == []
    dry = collect(sessions, blob_store, retention, dry_run=True, now=LATER)
    assert set(dry.deleted) == drop | {stray}
    assert all(blob_store.exists(k) for k in keep | drop | {stray})  # a dry run deletes nothing

    report = collect(sessions, blob_store, retention, now=LATER)
    assert set(report.deleted) == drop | {stray}
    assert all(blob_store.exists(k) for k in keep), "a referenced blob was deleted"
    assert not any(blob_store.exists(k) for k in drop | {stray})


def test_stale_partial_uploads_are_removed(sessions: sessionmaker[Session], blob_store: BlobStore) -> None:
    blob_store.staging_append("abandoned", 0, [b"half an upload"], max_size=100)
    retention = Retention(min_age_s=5, staging_max_age_s=5)
    assert collect(sessions, blob_store, retention).staging_deleted == []
    assert collect(sessions, blob_store, retention, now=LATER).staging_deleted == ["abandoned"]
    assert blob_store.staging_size("abandoned") == 0


def test_content_written_again_gets_a_fresh_grace_period(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    key = store.put_bytes(b"same bytes")
    path = tmp_path / "objects" / key[:2] / key[2:]
    os.utime(path, (0, 0))  # written long ago, then unreferenced
    assert store.put_bytes(b"same bytes") == key  # deduplicated: now referenced again
    assert time.time() - path.stat().st_mtime < 60


def test_fedhl_gc_dry_run_lists_and_keeps(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fedhl.db'}"
    migrate(url)
    store = FileBlobStore(tmp_path / "blobs")
    stray = store.put_bytes(b"stray")
    os.utime(store_path := tmp_path / "blobs" / "objects" / stray[:2] / stray[2:], (0, 0))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")},
        "FEDHL_DATABASE_URL": url,
        "FEDHL_BLOB_URL": f"file://{tmp_path / 'blobs'}",
    }
    out = subprocess.run(
        [sys.executable, "-m", "fedhl.cli", "gc", "--dry-run"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert f"would delete blob {stray}" in out and '"deleted": 1' in out
    assert store_path.exists()
