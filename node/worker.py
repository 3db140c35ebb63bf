"""Inference workers: separate processes that claim jobs from the database and run them.

A job runs as its steps: claim -> load -> analyse -> write -> queue -> complete (`JobRunner._process`).
A crash, a hang or an out-of-memory kill in inference takes down only its worker: the supervisor in
`edgenode serve` (node.supervisor) starts a new one, and the job's lease expires and puts it back in the queue.
Workers never send: they queue results and wake the serve process's sender (node.sender).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from db.audit import record_audit
from db.jobs import ClaimedJob, LeaseLost, claim_next_job, complete_job, defer_job, fail_job, heartbeat, release_job
from db.models import AuditEventType
from db.session import Database
from node.config import PeerSettings, Settings
from node.heartbeat import Heartbeat, JobAborted
from node.identity import node_identity
from node.job_series import SeriesFiles, modalities_to_process, series_to_process
from node.model_loader import LoadedModel, pin_worker_gpu
from node.parent_watch import ParentWatch
from node.sender import EventLike
from node.spool import Spool

if TYPE_CHECKING:
    from inference.anomaly_result import AnomalyResult
    from inference.unet import ModelInfo
    from node.models import ServingModel
    from node.results import ResultObject

log = logging.getLogger(__name__)

EXIT_NO_MODEL = 3
IDLE_POLL_SECONDS = 0.2  # an idle worker looks for a due job this often (one indexed SELECT) unless woken sooner
MAX_DEFER_SECONDS = 600.0  # longest wait before retrying a job deferred because the inference server was down


class UnroutableJob(Exception):
    """The job's results have nowhere to go (its destination AE is not configured)."""


@dataclass
class JobPlan:
    """What the load step found: the series to analyse, the model, where the results go."""

    series: list[SeriesFiles]
    destination: PeerSettings
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds, as stored on the job

    def add(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


@dataclass
class JobOutcome:
    """What the analysed series produced, for the job's row."""

    scores: list[float] = field(default_factory=list)
    uncertainties: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # series that could not be analysed, and why
    unserved: list[str] = field(default_factory=list)  # not analysed by design (no model for it, a lateral view), why
    models_used: dict[str, None] = field(default_factory=dict)  # model ids, in first-use order
    produced: int = 0  # result objects queued

    def add(self, result: AnomalyResult, objects: int) -> None:
        self.scores.append(result.study_score)
        self.uncertainties.append(result.mean_uncertainty)
        self.produced += objects


class JobRunner:
    """Runs claimed jobs end to end, one step per method below, in the order they run."""

    def __init__(
        self,
        settings: Settings,
        owner: str,
        stop: threading.Event | None = None,
        results_queued: EventLike | None = None,
    ) -> None:
        self.settings = settings
        self.owner = owner
        self.stop = stop or threading.Event()
        self.results_queued = results_queued  # the serve process's sender waits on it
        self.db = Database(settings.database_url, run_migrations=False)
        self.spool = Spool(settings.spool_dir, writer=node_identity(settings.data_dir))  # tags its temp files
        self.model = LoadedModel(settings)
        self._server_down_streak = 0  # jobs deferred in a row because the inference server could not serve

    # ---- claim ----------------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and run one job; False when the queue had nothing due."""
        with self.db.session() as session:
            # Only studies whose files this node's spool holds (all of them, where the nodes share one spool).
            job = claim_next_job(session, self.owner, self.settings.jobs.lease_seconds, spool_id=self.spool.id)
        if job is None:
            return False
        self.run(job)
        return True

    def run(self, job: ClaimedJob) -> None:
        """Run the job under its lease; every way it can end leaves it in the right state."""
        from engines.triton_backend import TritonModelMismatch, TritonUnavailable
        from inference.volume import SeriesError

        log.info("job %s: study %s, attempt %s", job.id, job.study_instance_uid, job.attempts)
        try:
            with Heartbeat(self.db, job.id, self.owner, self.settings) as beat:

                def check() -> None:
                    beat.check()
                    if self.stop.is_set():
                        raise JobAborted("the node is stopping")

                self._process(job, check)
        except (JobAborted, LeaseLost) as exc:
            log.warning("job %s abandoned: %s", job.id, exc)
            if self.stop.is_set():
                with self.db.session() as session:
                    release_job(session, job.id, self.owner)
        except (TritonUnavailable, TritonModelMismatch) as exc:
            # The GPU pool is down, slow, or was redeployed with another model: wait for it, the job itself is fine.
            self._defer(job, f"{type(exc).__name__}: {exc}")
        except (SeriesError, UnroutableJob) as exc:  # retrying cannot help
            self._fail(job, f"{type(exc).__name__}: {exc}", max_attempts=1)
        except Exception as exc:  # noqa: BLE001 - anything else is retried with backoff
            log.exception("job %s failed", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}", max_attempts=self.settings.jobs.max_attempts)

    def _process(self, job: ClaimedJob, check: Callable[[], None]) -> None:
        """The claimed job's steps: load, then per series analyse -> write -> queue, then complete. `check` raises
        JobAborted between steps (and inside the pipeline) once the job is no longer ours or the node stops."""
        from inference.volume import SeriesError, UnsupportedViewError

        job_started = time.perf_counter()
        plan = self.load(job)
        outcome = JobOutcome()
        for item in plan.series:
            check()
            served = self.model.for_modality(item.modality)
            if served is None:  # never a model on a modality it was not trained for: nothing is sent for it
                why = self.model.refusal(item.modality)
                outcome.unserved.append(f"series {item.series_instance_uid}: {why}")
                self._audit_skipped(job, item, why)
                continue
            try:
                result = self.analyse(item, plan, check, served)
            except UnsupportedViewError as exc:  # a lateral view: not analysed by design, as a modality without a model
                outcome.unserved.append(f"series {item.series_instance_uid}: {exc}")
                self._audit_skipped(job, item, str(exc))
                continue
            except SeriesError as exc:  # e.g. a scout or a dose report beside the image series: skip just that one
                outcome.skipped.append(f"series {item.series_instance_uid}: {exc}")
                self._audit_skipped(job, item, str(exc))
                continue
            check()
            objects = self.write(job, item, result, plan, served.info)
            check()
            self.queue(job, item, result, objects, plan, served.info.model_id)
            outcome.add(result, len(objects))
            outcome.models_used[served.info.model_id] = None
        plan.timings["total"] = time.perf_counter() - job_started  # the worker's time on the job (not the queue)
        self.complete(job, plan, outcome)

    # ---- load -----------------------------------------------------------------------------------
    def load(self, job: ClaimedJob) -> JobPlan:
        """The study's series to analyse, the models (loaded by a worker's first job), the destination."""
        from inference.volume import SeriesError

        queue_wait = max(0.0, time.time() - job.created_at.timestamp())
        rule = next((r for r in self.settings.routing if r.name == job.rule), None)
        series = series_to_process(self.db, self.spool, job, modalities_to_process(rule))
        if not series:
            raise SeriesError(f"study {job.study_instance_uid} has no CT/CR/DX image series to process")
        started = time.perf_counter()
        self.model.load()  # every configured model that serves a modality
        model_load = time.perf_counter() - started  # paid by a worker's first job only
        destination = self.settings.peer(job.destination_ae)
        if destination is None:
            raise UnroutableJob(f"results destination {job.destination_ae!r} is not in [[peers]]")
        return JobPlan(series, destination, {"queue_wait": queue_wait, "load": model_load})

    # ---- analyse --------------------------------------------------------------------------------
    def analyse(
        self, item: SeriesFiles, plan: JobPlan, check: Callable[[], None], served: ServingModel
    ) -> AnomalyResult:
        """The pipeline on one series with the model for its modality (smaller batches on GPU out-of-memory)."""
        started = time.perf_counter()
        result = self.model.analyse(item.paths, check, served)
        # "load" is reading the series; "infer" the rest of the pipeline (mask, model grid, U-Net, threshold)
        series_load = result.timings.get("load", 0.0)
        plan.add("load", series_load)
        plan.add("infer", time.perf_counter() - started - series_load)
        for stage, seconds in result.timings.items():
            plan.add(f"infer.{stage}", seconds)
        result.left_out = [  # a file too damaged to name itself: named by the UID it was received as
            left if left.sop_instance_uid else replace(left, sop_instance_uid=item.sop_instance_uids.get(left.path))
            for left in result.left_out
        ]
        return result

    # ---- write ----------------------------------------------------------------------------------
    def write(
        self, job: ClaimedJob, item: SeriesFiles, result: AnomalyResult, plan: JobPlan, model_info: ModelInfo
    ) -> list[ResultObject]:
        """The result objects (SEG, heatmaps, SR) from the result and the source headers it carries."""
        from node.results import write_results

        started = time.perf_counter()
        # No second read of the series: the headers come with the result; only the heatmaps' slices read their
        # pixels, when drawn (highdicom deep-copies the sources: 80 CT slices' pixels would cost ~1.5 s here).
        sources = result.writer_sources(with_pixels=result.top_slices(self.settings.results.heatmap_slices))
        # A series analysed in parts needs distinct result UIDs per part (they derive from this key).
        job_key = f"job-{job.id}" + (f"-{item.part}" if item.part else "")
        objects = write_results(result, sources, job_key, self.settings.results, model_info)
        plan.add("encode", time.perf_counter() - started)
        return objects

    # ---- queue ----------------------------------------------------------------------------------
    def queue(
        self,
        job: ClaimedJob,
        item: SeriesFiles,
        result: AnomalyResult,
        objects: list[ResultObject],
        plan: JobPlan,
        model_id: str,
    ) -> None:
        """Store the objects in the spool and queue them for the destination, if the job is still ours."""
        from node.outbound import enqueue

        lease = self.settings.jobs.lease_seconds

        def still_ours(session: Session) -> bool:  # renews the lease in the queueing transaction, if still ours
            return heartbeat(session, job.id, self.owner, lease)

        started = time.perf_counter()
        enqueue(
            self.db,
            self.spool,
            job.id,
            objects,
            plan.destination,
            still_ours=still_ours,
            source_series_uid=item.series_instance_uid,
            model_id=model_id,
        )
        self._audit_left_out(job, item, result)
        plan.add("enqueue", time.perf_counter() - started)

    # ---- complete -------------------------------------------------------------------------------
    def complete(self, job: ClaimedJob, plan: JobPlan, outcome: JobOutcome) -> None:
        """Record the job done (if still ours) and wake the sender. Series that failed and none analysed fail the
        job; only series not analysed by design (a CR study and no radiograph model, a lateral view) complete it,
        with nothing sent."""
        from inference.volume import SeriesError

        if not outcome.scores and outcome.skipped:
            raise SeriesError("no image series could be analysed: " + "; ".join(outcome.skipped + outcome.unserved))
        with self.db.session() as session:
            done = complete_job(
                session,
                job.id,
                self.owner,
                score=max(outcome.scores) if outcome.scores else None,
                uncertainty=max(outcome.uncertainties) if outcome.uncertainties else None,
                model_id=",".join(outcome.models_used)[:80],
                timings={k: round(v, 4) for k, v in plan.timings.items()},
            )
        self._server_down_streak = 0
        if done and not outcome.scores:
            log.info("job %s done: nothing analysed (%s)", job.id, "; ".join(outcome.unserved))
        elif done:
            log.info("job %s done: %d object(s), score %.3f", job.id, outcome.produced, max(outcome.scores))
            if self.results_queued is not None:
                self.results_queued.set()  # the serve process's sender delivers them now, not at its next pass
        else:
            log.warning("job %s finished here but is no longer this worker's (superseded or re-queued)", job.id)

    # ---- how a job that did not complete ends ---------------------------------------------------
    def _defer(self, job: ClaimedJob, reason: str) -> None:
        """Back to the queue without using an attempt; waits double while the server stays down."""
        self._server_down_streak += 1
        first = self.settings.jobs.retry_backoff_seconds
        delay = min(first * 2 ** (self._server_down_streak - 1), max(first, MAX_DEFER_SECONDS))
        log.warning("job %s deferred for %.0f s: %s", job.id, delay, reason)
        with self.db.session() as session:
            defer_job(session, job.id, self.owner, reason, delay_seconds=delay)

    def _fail(self, job: ClaimedJob, error: str, *, max_attempts: int) -> None:
        with self.db.session() as session:
            fail_job(
                session,
                job.id,
                self.owner,
                error,
                max_attempts=max_attempts,
                backoff_seconds=self.settings.jobs.retry_backoff_seconds,
            )

    # ---- audit ----------------------------------------------------------------------------------
    def _audit_skipped(self, job: ClaimedJob, item: SeriesFiles, why: str) -> None:
        log.warning("job %s: series %s skipped: %s", job.id, item.series_instance_uid, why)
        one_radiograph = item.part if item.part and len(item.paths) == 1 else ""
        detail = f"not analysed ({item.modality}, {len(item.paths)} instance(s)): {why}"
        with self.db.session() as session:
            _audit_series_warning(session, AuditEventType.SERIES_SKIPPED, job, item, one_radiograph, detail)

    def _audit_left_out(self, job: ClaimedJob, item: SeriesFiles, result: AnomalyResult) -> None:
        """One `instance.skipped` event per instance the loader left out of the series whose results were just
        queued (the SR names them too)."""
        if not result.left_out:
            return
        with self.db.session() as session:
            for left in result.left_out:
                log.warning("job %s: instance left out of series %s: %s", job.id, item.series_instance_uid, left.reason)
                detail = (
                    f"left out of the analysis of its {item.modality} series, which went ahead without it: "
                    f"{left.summary} ({left.reason})"
                )
                sop = left.sop_instance_uid or ""
                _audit_series_warning(session, AuditEventType.INSTANCE_SKIPPED, job, item, sop, detail)


def _audit_series_warning(
    session: Session, event: AuditEventType, job: ClaimedJob, item: SeriesFiles, sop_instance_uid: str, detail: str
) -> None:
    """A warning-level audit event about one series of a job (or one instance of it)."""
    record_audit(
        session,
        event,
        outcome="warning",
        job_id=job.id,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=item.series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        detail=detail[:4000],
    )


def serve_jobs(
    run_once: Callable[[], bool], stop: threading.Event, wake: EventLike | None, poll_seconds: float = IDLE_POLL_SECONDS
) -> None:
    """Claim and run jobs until `stop`; when the queue is empty, wait for `wake` (or `poll_seconds`).

    `wake` is cleared before each claim, so a job created during a claim is never slept through: its wake-up
    makes the wait return at once. Without `wake` an idle worker just polls.
    """
    while not stop.is_set():
        if wake is None:
            if not run_once():
                stop.wait(poll_seconds)
            continue
        wake.clear()
        if not run_once():
            wake.wait(poll_seconds)


def worker_main(
    settings_json: str,
    owner: str,
    slot: int = 0,
    wake: EventLike | None = None,
    results_queued: EventLike | None = None,
) -> None:
    """Entry point of a worker process: claim and run jobs until SIGTERM.

    `wake` (shared with the supervisor) is set when jobs are created: an idle worker claims them at once instead
    of at its next poll. The worker sets `results_queued` when it queued results, for the serve process's sender.
    """
    settings = Settings.model_validate_json(settings_json)
    from node.cli import configure_logging

    configure_logging(settings.logging.level)
    stop = threading.Event()
    ParentWatch(stop.set).start()  # orphaned (the node was SIGKILLed): claim nothing more, release the job, exit
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    runner = JobRunner(settings, owner, stop, results_queued)
    try:
        gpu = pin_worker_gpu(slot, settings.inference.device)
        if gpu is not None:
            log.info("worker %s runs on GPU %d", owner, gpu)
        denoiser, info = runner.model.load()
    except Exception as exc:  # noqa: BLE001 - a worker without a model must not claim jobs
        log.error("worker %s cannot load the model: %s; jobs stay queued", owner, exc)
        sys.exit(EXIT_NO_MODEL)
    log.info("worker %s started (pid %d): %s on %s", owner, os.getpid(), info.model_id, denoiser.name)
    serve_jobs(runner.run_once, stop, wake)
    log.info("worker %s stopped", owner)
