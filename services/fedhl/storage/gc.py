"""Blob lifecycle: delete what no table references any more, and abandoned partial uploads.

Kept: every blob a job, an unfinished round, one of each job's last K rounds or last K
checkpoints references (`BlobRefRepo.referenced`), and every blob younger than `min_age_s`
(written but perhaps not yet referenced: an upload's blob is stored before its row commits,
a round's state before the commit transaction). Objects are listed before the references are
read, so a blob referenced after the read is young or was listed as referenced. Staging files
untouched for `staging_max_age_s` are discarded (the agent restarts that upload from 0)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from .blobs import BlobStore
from .db import transaction
from .repos import BlobRefRepo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    keep_checkpoints: int = 5  # per job, with the rounds that produced them
    min_age_s: float = 3600.0  # never delete a blob younger than this
    staging_max_age_s: float = 86400.0  # partial uploads untouched this long are discarded


@dataclass
class GcReport:
    dry_run: bool
    objects: int = 0
    referenced: int = 0
    deleted: list[str] = field(default_factory=list)
    staging_deleted: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "objects": self.objects,
            "referenced": self.referenced,
            "deleted": len(self.deleted),
            "staging_deleted": len(self.staging_deleted),
        }


def collect(
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    retention: Retention,
    *,
    dry_run: bool = False,
    now: Callable[[], float] = time.time,
) -> GcReport:
    report = GcReport(dry_run)
    objects = list(blobs.list_objects())  # before the references: see the module docstring
    with transaction(sessions, read_only=True) as s:
        refs = BlobRefRepo(s).referenced(retention.keep_checkpoints)
    t = now()
    report.objects = len(objects)
    for key, written in objects:
        if key in refs:
            report.referenced += 1
        elif t - written >= retention.min_age_s:
            report.deleted.append(key)
            if not dry_run:
                blobs.delete(key)
    for upload_id, touched in list(blobs.list_staging()):
        if t - touched >= retention.staging_max_age_s:
            report.staging_deleted.append(upload_id)
            if not dry_run:
                blobs.staging_discard(upload_id)
    if report.deleted or report.staging_deleted:
        log.info("blob gc: %s", report.summary())
    return report
