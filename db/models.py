"""SQLAlchemy 2 models: what the node received, what it ran, what it produced and sent, and the audit trail.

The schema is owned by Alembic (db/migrations); change a model only together with a new revision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    # Every model maps one table (no inheritance mapping), so its __table__ is a Table: the Core statements of
    # the hot paths (db/ingest.py, db/audit.py) are built on it.
    __table__: ClassVar[Table]


class StudyStatus(StrEnum):
    RECEIVING = "receiving"  # instances arriving, quiet period not over
    COMPLETE = "complete"  # quiet period over, no job (routing declined or own output only)
    QUEUED = "queued"  # a job waits
    PROCESSING = "processing"
    DONE = "done"  # results produced (delivery tracked on outbound items)
    FAILED = "failed"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # gave up after max attempts
    SUPERSEDED = "superseded"  # the study grew; a newer job replaces this one


class OutboundStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # gave up after max attempts; `edgenode outbound retry` revives it


class ResultKind(StrEnum):
    """What a result object is. The values are stored in `results.kind` and shown by the CLI and REST API: keep them."""

    SEG = "seg"  # BINARY SEG of the thresholded finding
    SEG_ANOMALY = "seg-anomaly"  # FRACTIONAL SEG of the anomaly map
    SEG_UNCERTAINTY = "seg-uncertainty"  # FRACTIONAL SEG of the ensemble uncertainty
    SC = "sc"  # RGB secondary-capture heatmap
    SR = "sr"  # TID 1500 measurement report


# The statuses of an active job, as SQL for the partial unique index (the values of JobStatus.QUEUED and RUNNING).
ACTIVE_JOB_SQL = "status IN ('queued', 'running')"

PRIORITY_ROUTINE = 0
PRIORITY_STAT = 10


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.RECEIVING)
    priority: Mapped[int] = mapped_column(Integer, default=PRIORITY_ROUTINE)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Count of source (not own-output) instances when the study was last judged complete;
    # a larger count later means the study grew and needs a new job.
    completed_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # The spool holding its received files (node/spool.py: spool_id); None for rows from before migration 0005.
    spool_id: Mapped[str | None] = mapped_column(String(32), nullable=True)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan")

    __table_args__ = (Index("ix_studies_status_last", "status", "last_received_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    is_own_output: Mapped[bool] = mapped_column(Boolean, default=False)  # produced by this node
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One inference run over a study; the jobs table is the queue (claimed with a lease)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=PRIORITY_ROUTINE)
    rule: Mapped[str] = mapped_column(String(64), default="")
    destination_ae: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)  # source instances at creation
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    superseded_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertainty: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_id: Mapped[str] = mapped_column(String(80), default="")
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)  # stage -> seconds

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job", cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_jobs_queue", "status", "priority", "next_attempt_at"),
        # At most one active job per study (migration 0004): concurrent stability scans cannot both queue one.
        Index(
            "uq_jobs_active_study",
            "study_id",
            unique=True,
            sqlite_where=text(ACTIVE_JOB_SQL),
            postgresql_where=text(ACTIVE_JOB_SQL),
        ),
    )


class Result(Base):
    """A DICOM object the node produced for a job (SEG, SC heatmap, SR)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # Stored as the enum's values in a VARCHAR(16) (no native enum type, no CHECK: the schema is unchanged).
    kind: Mapped[ResultKind] = mapped_column(
        Enum(ResultKind, native_enum=False, length=16, values_callable=lambda kinds: [k.value for k in kinds])
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # The source series it was made from and the model that analysed it (migration 0005; empty on older rows).
    source_series_instance_uid: Mapped[str] = mapped_column(String(64), default="", server_default="")
    model_id: Mapped[str] = mapped_column(String(80), default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    spool_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the spool holding `path`

    job: Mapped[Job] = relationship(back_populates="results")
    outbound: Mapped[list[OutboundItem]] = relationship(back_populates="result", cascade="all, delete-orphan")


class OutboundItem(Base):
    """One result file to deliver to one destination; the file stays until the peer acknowledged it."""

    __tablename__ = "outbound"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    destination_ae: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=OutboundStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # last DIMSE status
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The sender sending it now (node/identity.py: sender_owner) until then, on the database's clock.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    result: Mapped[Result] = relationship(back_populates="outbound")

    __table_args__ = (Index("ix_outbound_due", "status", "next_attempt_at"),)


class JobDuration(Base):
    """How long each finished job took: appended when a job is done and never deleted (retention removes the
    jobs themselves), so the duration histograms in /metrics only ever grow, as Prometheus expects."""

    __tablename__ = "job_durations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer)  # no foreign key: the job row may be gone, this row stays
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    worker_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    queue_wait_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditEvent(Base):
    """Append-only record of what happened (database triggers refuse UPDATE and DELETE on SQLite).

    Never holds patient names; patient ID and accession identify the study for audit queries.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    event_type: Mapped[str] = mapped_column(String(48), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="success")  # success | warning | failure
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dimse_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class AuditEventType(StrEnum):
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    ASSOCIATION_ABORTED = "association.aborted"
    ASSOCIATION_RELEASED = "association.released"
    CONNECTION_REFUSED = "connection.refused"  # closed at once: too many connections from its address waiting
    CONNECTION_DROPPED = "connection.dropped"  # no A-ASSOCIATE-RQ in time, not DICOM, or TLS failed
    ECHO = "echo"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_REJECTED = "instance.rejected"
    INSTANCE_CONFLICT = "instance.conflict"  # same SOP Instance UID, different content: first copy kept
    STUDY_COMPLETE = "study.complete"
    JOB_CREATED = "job.created"
    JOB_SUPERSEDED = "job.superseded"
    JOB_STARTED = "job.started"
    JOB_DONE = "job.done"
    JOB_FAILED = "job.failed"
    JOB_RETRY = "job.retry"
    SERIES_SKIPPED = "series.skipped"
    INSTANCE_SKIPPED = "instance.skipped"  # left out of its series' analysis (damaged); the rest was analysed
    RESULT_CREATED = "result.created"
    SEND_OK = "send.ok"
    SEND_RETRY = "send.retry"
    SEND_DEAD = "send.dead"
    SEND_REQUEUED = "send.requeued"
    RETENTION_DELETED = "retention.deleted"
    NODE_STARTED = "node.started"
    NODE_STOPPED = "node.stopped"
