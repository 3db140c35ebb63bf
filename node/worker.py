"""Inference workers: separate processes that claim jobs from the database and run them.

A crash, a hang or an out-of-memory kill in inference takes down only its worker: the supervisor in
`edgenode serve` starts a new one, and the job's lease expires and puts it back in the queue.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.audit import record_audit
from db.jobs import ClaimedJob, LeaseLost, claim_next_job, complete_job, defer_job, fail_job, heartbeat, release_job
from db.models import AuditEventType, Instance, Series
from db.session import Database
from node.config import InferenceSettings, RoutingRule, Settings
from node.identity import node_identity, worker_owner
from node.inference_server import triton_endpoint
from node.parent_watch import ParentWatch
from node.spool import Spool

if TYPE_CHECKING:
    from inference.anomaly_result import AnomalyResult
    from inference.denoiser import Denoiser
    from inference.pipeline import PipelineSettings
    from inference.unet import ModelInfo

log = logging.getLogger(__name__)

IMAGE_MODALITIES = ("CT", "CR", "DX")
EXIT_NO_MODEL = 3
IDLE_POLL_SECONDS = 0.2  # an idle worker looks for a due job this often (one indexed SELECT) unless woken sooner
RESTART_BACKOFF_SECONDS = (1.0, 300.0)  # first and longest wait before restarting a worker that keeps dying
MAX_DEFER_SECONDS = 600.0  # longest wait before retrying a job deferred because the inference server was down


class EventLike(Protocol):
    """A multiprocessing.Event as the worker uses it."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class UnroutableJob(Exception):
    """The job's results have nowhere to go (its destination AE is not configured)."""


class JobAborted(Exception):
    """The worker lost the job's lease (superseded by a newer job, or stalled past its lease)."""


@dataclass(frozen=True)
class SeriesFiles:
    series_instance_uid: str
    modality: str
    paths: list[Path]
    part: str = ""  # set when a radiograph series is analysed in parts (images of different sizes)
    sop_instance_uids: dict[Path, str] = field(default_factory=dict, compare=False)  # as indexed at receipt


RADIOGRAPH_MODALITIES = ("CR", "DX")


def split_radiographs_by_size(item: SeriesFiles) -> list[SeriesFiles]:
    """A CR/DX series may hold views of different sizes (a PA and a lateral on other cassettes): each size is
    analysed as its own part, since radiographs are independent images. A CT series is never split."""
    if item.modality not in RADIOGRAPH_MODALITIES or len(item.paths) < 2:
        return [item]
    import pydicom

    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for path in item.paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            by_size[(int(header.Rows), int(header.Columns))].append(path)
        except Exception:  # noqa: BLE001 - unreadable here: the loader says what is wrong with it
            return [item]
    if len(by_size) == 1:
        return [item]
    return [
        SeriesFiles(item.series_instance_uid, item.modality, paths, f"{r}x{c}", item.sop_instance_uids)
        for (r, c), paths in by_size.items()
    ]


def pipeline_settings(inference: InferenceSettings, max_batch: int) -> PipelineSettings:
    """Map the operator's `[inference]` section onto the pipeline's settings."""
    from inference.pipeline import PipelineSettings

    return PipelineSettings(
        t_start=dict(inference.t_start),
        steps=inference.steps,
        ensemble=inference.ensemble,
        threshold_lambda=dict(inference.threshold_lambda),
        max_batch=max_batch,
        seed=inference.seed,
        min_ct_slices=inference.min_ct_slices,
    )


def modalities_to_process(rule: RoutingRule | None) -> tuple[str, ...]:
    """The image modalities a job analyses: its rule's (an empty list means any) that the model handles."""
    wanted = rule.modalities if rule is not None and rule.modalities else IMAGE_MODALITIES
    return tuple(m for m in wanted if m in IMAGE_MODALITIES)


def series_to_process(db: Database, spool: Spool, job: ClaimedJob, modalities: tuple[str, ...]) -> list[SeriesFiles]:
    """The study's source image series (never the node's own output), largest first."""
    with db.session() as session:
        rows = session.execute(
            select(Series.series_instance_uid, Series.modality, Instance.path, Instance.sop_instance_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == job.study_id, Series.is_own_output.is_(False), Series.modality.in_(modalities))
            .order_by(Series.id, Instance.id)
        ).all()
    grouped: dict[tuple[str, str], list[Path]] = defaultdict(list)
    sop_uids: dict[Path, str] = {}
    for uid, modality, relpath, sop_uid in rows:
        path = spool.path(relpath)
        grouped[(uid, modality)].append(path)
        sop_uids[path] = sop_uid
    found = [
        part
        for (uid, modality), paths in grouped.items()
        for part in split_radiographs_by_size(
            SeriesFiles(uid, modality, paths, sop_instance_uids={p: sop_uids[p] for p in paths})
        )
    ]
    return sorted(found, key=lambda s: -len(s.paths))


class Heartbeat:
    """Extends the job's lease in the background; flags `lost` when the lease is no longer ours."""

    def __init__(self, db: Database, job_id: int, owner: str, settings: Settings) -> None:
        self._db, self._job_id, self._owner, self._settings = db, job_id, owner, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        jobs = self._settings.jobs
        last_renewed = time.monotonic()
        while not self._stop.wait(jobs.heartbeat_seconds):
            try:
                with self._db.session() as session:
                    if not heartbeat(session, self._job_id, self._owner, jobs.lease_seconds):
                        self.lost.set()
                        return
                last_renewed = time.monotonic()
            except Exception:  # noqa: BLE001 - a database hiccup: keep beating, the lease has time left
                log.exception("job %s: could not renew the lease; trying again", self._job_id)
                if time.monotonic() - last_renewed >= jobs.lease_seconds:  # others may have taken the job by now
                    self.lost.set()
                    return

    def check(self) -> None:
        if self.lost.is_set():
            raise JobAborted(f"job {self._job_id} is no longer ours (superseded or lease expired)")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class JobRunner:
    """Runs claimed jobs end to end: load, infer, encode results, queue them for sending."""

    def __init__(self, settings: Settings, owner: str, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.owner = owner
        self.stop = stop or threading.Event()
        self.db = Database(settings.database_url, run_migrations=False)
        self.spool = Spool(settings.spool_dir, writer=node_identity(settings.data_dir))  # tags its temp files
        self._denoiser: Denoiser | None = None
        self._model_info: ModelInfo | None = None
        self.max_batch = settings.inference.max_batch
        self._sender: threading.Thread | None = None
        self._server_down_streak = 0  # jobs deferred in a row because the inference server could not serve

    def _engine(self) -> tuple[Denoiser, ModelInfo]:
        """Load the model and pick its backend once per worker process (the first job pays for it)."""
        if self._denoiser is None or self._model_info is None:
            from engines.select import resolve_model_path, select_denoiser
            from inference.pipeline import model_fit_problems
            from inference.unet import read_model_info

            path = resolve_model_path(self.settings.inference.model)
            self._model_info = read_model_info(path)
            problems = model_fit_problems(self._model_info.training, pipeline_settings(self.settings.inference, 1))
            if problems:  # it would run, and produce maps that mean nothing: refuse, saying why
                raise ValueError(f"model {self._model_info.model_id} does not fit [inference]: {'; '.join(problems)}")
            self._denoiser = select_denoiser(
                path,
                device=self.settings.inference.device,
                backend=self.settings.inference.backend,
                precision=self.settings.inference.precision,
                max_batch=self.settings.inference.max_batch,
                cache_dir=self.settings.data_dir / "engines",
                triton=triton_endpoint(self.settings) if self.settings.inference.backend == "triton" else None,
            )
        return self._denoiser, self._model_info

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
            return
        except (SeriesError, UnroutableJob) as exc:  # retrying cannot help
            self._fail(job, f"{type(exc).__name__}: {exc}", max_attempts=1)
        except Exception as exc:  # noqa: BLE001 - anything else is retried with backoff
            log.exception("job %s failed", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}", max_attempts=self.settings.jobs.max_attempts)

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

    def _process(self, job: ClaimedJob, check: Callable[[], None]) -> None:
        import pydicom

        from inference.pipeline import run_pipeline
        from inference.volume import SeriesError
        from node.outbound import enqueue
        from node.results import write_results

        job_started = time.perf_counter()
        timings: dict[str, float] = {"queue_wait": max(0.0, time.time() - job.created_at.timestamp())}
        rule = next((r for r in self.settings.routing if r.name == job.rule), None)
        series = series_to_process(self.db, self.spool, job, modalities_to_process(rule))
        if not series:
            raise SeriesError(f"study {job.study_instance_uid} has no CT/CR/DX image series to process")
        started = time.perf_counter()
        denoiser, model_info = self._engine()
        timings["load"] = time.perf_counter() - started  # the model: paid by a worker's first job only
        destination = self.settings.peer(job.destination_ae)
        if destination is None:
            raise UnroutableJob(f"results destination {job.destination_ae!r} is not in [[peers]]")
        lease = self.settings.jobs.lease_seconds

        def still_ours(session: Session) -> bool:  # renews the lease in the queueing transaction, if still ours
            return heartbeat(session, job.id, self.owner, lease)

        scores, uncertainties, produced, skipped = [], [], 0, []
        for item in series:
            check()
            started = time.perf_counter()
            try:
                result = self._infer_with_oom_retry(run_pipeline, item, denoiser, model_info, check)
            except SeriesError as exc:  # e.g. a scout or a dose report beside the image series: skip just that one
                skipped.append(f"series {item.series_instance_uid}: {exc}")
                self._audit_skipped(job, item, str(exc))
                continue
            # "load" is reading the series; "infer" the rest of the pipeline (mask, model grid, U-Net, threshold)
            series_load = result.timings.get("load", 0.0)
            timings["load"] += series_load
            timings["infer"] = timings.get("infer", 0.0) + time.perf_counter() - started - series_load
            for stage, seconds in result.timings.items():
                timings[f"infer.{stage}"] = timings.get(f"infer.{stage}", 0.0) + seconds
            check()
            result.left_out = [  # a file too damaged to name itself: named by the UID it was received as
                left if left.sop_instance_uid else replace(left, sop_instance_uid=item.sop_instance_uids.get(left.path))
                for left in result.left_out
            ]
            started = time.perf_counter()
            # Pixel data stays on disk until a heatmap needs it: highdicom deep-copies the sources, and copying
            # 80 CT slices' pixels cost ~1.5 s of the encode stage (the objects written are the same).
            left_out = {left.path for left in result.left_out}
            sources = [pydicom.dcmread(p, defer_size="64 KB") for p in item.paths if p not in left_out]
            # A series analysed in parts needs distinct result UIDs per part (they derive from this key).
            job_key = f"job-{job.id}" + (f"-{item.part}" if item.part else "")
            objects = write_results(result, sources, job_key, self.settings.results, model_info)
            timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - started
            check()
            started = time.perf_counter()
            enqueue(self.db, self.spool, job.id, objects, destination, still_ours=still_ours)
            self._audit_left_out(job, item, result)
            timings["enqueue"] = timings.get("enqueue", 0.0) + time.perf_counter() - started
            produced += len(objects)
            scores.append(result.study_score)
            uncertainties.append(result.mean_uncertainty)
        if not scores:
            raise SeriesError("no image series could be analysed: " + "; ".join(skipped))
        timings["total"] = time.perf_counter() - job_started  # the worker's time on the job (not the queue)
        with self.db.session() as session:
            done = complete_job(
                session,
                job.id,
                self.owner,
                score=max(scores),
                uncertainty=max(uncertainties),
                model_id=model_info.model_id,
                timings={k: round(v, 4) for k, v in timings.items()},
            )
        self._server_down_streak = 0
        if done:
            log.info("job %s done: %d object(s), score %.3f", job.id, produced, max(scores))
            self.kick_sender()
        else:
            log.warning("job %s finished here but is no longer this worker's (superseded or re-queued)", job.id)

    def _audit_skipped(self, job: ClaimedJob, item: SeriesFiles, why: str) -> None:
        log.warning("job %s: series %s skipped: %s", job.id, item.series_instance_uid, why)
        with self.db.session() as session:
            record_audit(
                session,
                AuditEventType.SERIES_SKIPPED,
                outcome="warning",
                job_id=job.id,
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=item.series_instance_uid,
                detail=f"not analysed ({item.modality}, {len(item.paths)} instance(s)): {why}"[:4000],
            )

    def _audit_left_out(self, job: ClaimedJob, item: SeriesFiles, result: AnomalyResult) -> None:
        """One `instance.skipped` event per instance the loader left out of the series whose results were just
        queued (the SR names them too)."""
        if not result.left_out:
            return
        with self.db.session() as session:
            for left in result.left_out:
                log.warning("job %s: instance left out of series %s: %s", job.id, item.series_instance_uid, left.reason)
                record_audit(
                    session,
                    AuditEventType.INSTANCE_SKIPPED,
                    outcome="warning",
                    job_id=job.id,
                    study_instance_uid=job.study_instance_uid,
                    series_instance_uid=item.series_instance_uid,
                    sop_instance_uid=left.sop_instance_uid or "",
                    detail=f"left out of the analysis of its {item.modality} series, which went ahead without it: "
                    f"{left.summary} ({left.reason})"[:4000],
                )

    def kick_sender(self) -> None:
        """Deliver the results now instead of at the scheduler's next send pass (up to `send.interval_seconds`
        later), in a thread so the next job can start. Beside a pass of the scheduler's, each item is still sent once:
        senders claim items one by one (node/outbound.py)."""
        from node.outbound import send_due

        if self._sender is not None and self._sender.is_alive():
            return

        def send() -> None:
            try:
                send_due(self.settings, self.db, self.spool)
            except Exception:  # noqa: BLE001 - the scheduler's next pass retries
                log.exception("sending right after the job failed; the scheduler's send pass will retry")

        self._sender = threading.Thread(target=send, name="send-after-job", daemon=True)
        self._sender.start()

    def join_sender(self, timeout: float) -> None:
        if self._sender is not None:
            self._sender.join(timeout)

    def _infer_with_oom_retry(self, run_pipeline, item: SeriesFiles, denoiser, model_info, check):
        """Run the pipeline; on GPU out-of-memory halve the batch and try again instead of failing."""
        import torch

        while True:
            settings = pipeline_settings(self.settings.inference, self.max_batch)
            try:
                return run_pipeline(item.paths, denoiser, model_info, settings, progress=lambda *_: check())
            except torch.cuda.OutOfMemoryError:
                if self.max_batch <= 1:
                    raise
                self.max_batch //= 2
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: retrying with batches of %d", self.max_batch)


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


def pin_worker_gpu(slot: int, device: str) -> int | None:
    """Make GPU `slot mod count` this process's current CUDA device, so `workers = <number of GPUs>` puts one
    worker on each GPU (every backend runs on the current device). None when the worker runs on the CPU."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = slot % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index


def worker_main(settings_json: str, owner: str, wake: EventLike | None = None) -> None:
    """Entry point of a worker process: claim and run jobs until SIGTERM.

    `wake` (shared with the supervisor) is set when jobs are created: an idle worker claims them at once instead
    of at its next poll.
    """
    settings = Settings.model_validate_json(settings_json)
    from node.cli import configure_logging

    configure_logging(settings.logging.level)
    stop = threading.Event()
    ParentWatch(stop.set).start()  # orphaned (the node was SIGKILLed): claim nothing more, release the job, exit
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    runner = JobRunner(settings, owner, stop)
    try:
        gpu = pin_worker_gpu(WorkerSupervisor._slot(owner), settings.inference.device)
        if gpu is not None:
            log.info("worker %s runs on GPU %d", owner, gpu)
        denoiser, info = runner._engine()
    except Exception as exc:  # noqa: BLE001 - a worker without a model must not claim jobs
        log.error("worker %s cannot load the model: %s; jobs stay queued", owner, exc)
        sys.exit(EXIT_NO_MODEL)
    log.info("worker %s started (pid %d): %s on %s", owner, os.getpid(), info.model_id, denoiser.name)
    serve_jobs(runner.run_once, stop, wake)
    runner.join_sender(timeout=10)  # an interrupted send is safe (resent later), a finished one is quicker
    log.info("worker %s stopped", owner)


class WorkerSupervisor:
    """Keeps `inference.workers` worker processes alive; restarts any that die, backing off if they keep dying."""

    name = "workers"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self._failures: dict[int, int] = {}  # slot -> consecutive early exits
        self._not_before: dict[int, float] = {}  # slot -> monotonic time of the next allowed start
        self._lock = threading.Lock()
        self._stopping = False
        self._generation = 0
        self._started_at: dict[str, float] = {}
        self._wake = self._ctx.Event()  # set by wake(): new jobs; every worker process shares it
        self.identity = node_identity(settings.data_dir)  # prefixes its workers' lease owner ids

    def _spawn(self, slot: int) -> None:
        self._generation += 1
        owner = worker_owner(self.identity, slot, self._generation)
        proc = self._ctx.Process(
            target=worker_main, args=(self.settings.model_dump_json(), owner, self._wake), name=owner
        )
        proc.start()
        self._procs[owner] = proc
        self._started_at[owner] = time.monotonic()

    def start(self) -> None:
        with self._lock:
            for slot in range(self.settings.inference.workers):
                self._spawn(slot)

    @staticmethod
    def _slot(owner: str) -> int:
        return int(owner.rsplit("-", 1)[1].split(".", 1)[0])

    def check(self) -> None:
        """Restart dead workers (called periodically by the scheduler)."""
        with self._lock:
            if self._stopping:
                return
            now = time.monotonic()
            for owner, proc in list(self._procs.items()):
                if proc.is_alive():
                    continue
                slot = self._slot(owner)
                if slot not in self._not_before:
                    if now - self._started_at.pop(owner, now) > 60:
                        self._failures[slot] = 0  # it ran well for a while: not a crash loop
                    failures = self._failures.get(slot, 0) + 1
                    self._failures[slot] = failures
                    first, longest = RESTART_BACKOFF_SECONDS
                    delay = min(first * 2 ** (failures - 1), longest)
                    self._not_before[slot] = now + delay
                    log.error("worker %s exited with code %s; restarting in %.0f s", owner, proc.exitcode, delay)
                if now >= self._not_before[slot]:
                    del self._procs[owner]
                    del self._not_before[slot]
                    self._spawn(slot)

    def wake(self) -> None:
        """New jobs are queued: idle workers claim now instead of at their next poll (IDLE_POLL_SECONDS)."""
        self._wake.set()

    def alive_count(self) -> int:
        """Worker processes running now (for /healthz: a crash-looping worker is mostly not)."""
        return len(self.pids())

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.pid is not None and p.is_alive()]

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True  # set before taking the lock: a check() that is waiting must not restart anyone
        with self._lock:
            for proc in self._procs.values():
                if proc.is_alive() and proc.pid:
                    os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in self._procs.values():
                proc.join(max(0.1, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            self._procs.clear()
