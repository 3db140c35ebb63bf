"""Validated settings: one object built from the TOML file and EDGENODE_<SECTION>__<KEY> env vars.

The keys are the operator's contract (docs/ and DESIGN.md): add keys, never rename them.
Precedence: environment > TOML file > defaults. Unknown keys are errors, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import json
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not AE_TITLE_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return stripped


MAX_LISTENERS = 64
AUTO_LISTENERS_MAX = 4  # "auto": beyond four, the disk's fsyncs and the index commits limit ingest, not the CPU


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeSettings(Section):
    ae_title: str = "EDGENODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("var")
    # Received and result files; empty: <data_dir>/spool. Nodes sharing one database may share one spool (a shared
    # mount at the same or another path): then any of them can send (and take over) the others' results.
    spool_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # when set, clients must present a certificate signed by it
    max_associations: int = Field(16, ge=1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    min_free_disk_mb: int = Field(1024, ge=0)  # below this, stores answer 0xA700 and associations are refused
    require_called_ae: bool = True  # reject associations whose called AE title is not ours
    shutdown_grace_seconds: float = Field(5.0, ge=0)  # on stop, open associations get this long to finish
    # The listener's front door (node/gate.py): a new connection must finish TLS and send its A-ASSOCIATE-RQ
    # within pending_timeout_seconds, and at most max_pending_per_address may wait per source address; refused
    # and dropped connections are audited at most a few times per address per refusal_audit_interval_seconds.
    pending_timeout_seconds: float = Field(5.0, gt=0)
    max_pending_per_address: int = Field(16, ge=1)
    refusal_audit_interval_seconds: float = Field(60.0, gt=0)
    # Listener processes sharing the DICOM port (node/listeners.py): one interpreter receives at most one core's
    # worth of associations. "auto" (or 0): one per CPU core, at most 4; 1: the listener runs in the main process.
    listeners: int | Literal["auto"] = "auto"

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("listeners", mode="before")
    @classmethod
    def _auto(cls, value: object) -> object:
        if value == 0 or (isinstance(value, str) and value.strip().lower() in ("auto", "0")):
            return "auto"
        return value

    @field_validator("listeners")
    @classmethod
    def _process_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_LISTENERS:
            raise ValueError(f'a number of processes from 1 to {MAX_LISTENERS}, or "auto" (0)')
        return value

    def listener_count(self) -> int:
        """The listener processes to run: the configured number, or for "auto" one per usable CPU core, at most
        AUTO_LISTENERS_MAX (more interpreters than cores only add switching)."""
        if isinstance(self.listeners, int):
            return self.listeners
        return max(1, min(usable_cpus(), AUTO_LISTENERS_MAX))

    @model_validator(mode="after")
    def _tls_pair(self) -> NodeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        return self


class PeerSettings(Section):
    ae_title: str
    host: str = "127.0.0.1"
    port: int = Field(104, ge=1, le=65535)
    tls: bool = False  # use TLS when sending results to this peer
    # With tls: the name its certificate must carry (empty: `host`); tls_verify_name = false trusts the CA alone,
    # for PACS certificates that name no host, and is only allowed with a private CA ([node] tls_ca).
    tls_server_name: str = ""
    tls_verify_name: bool = True

    _ae = field_validator("ae_title")(_check_ae)


class DatabaseSettings(Section):
    url: str = ""  # empty: SQLite at <data_dir>/edgenode.db (WAL mode)


class StabilitySettings(Section):
    stable_seconds: float = Field(30.0, ge=0)
    max_wait_seconds: float = Field(900.0, gt=0)
    scan_interval_seconds: float = Field(1.0, gt=0)
    # Also scan the moment a study's quiet period ends (a one-shot wake-up per study), instead of leaving it
    # to the next periodic scan (up to scan_interval_seconds later).
    scan_at_quiet_end: bool = True


class Priority(StrEnum):
    ROUTINE = "routine"
    STAT = "stat"


class RoutingRule(Section):
    """Which complete studies get an inference job, with what priority and where results go."""

    name: str = "chest"
    modalities: list[str] = Field(default_factory=lambda: ["CT", "CR", "DX"])
    body_parts: list[str] = Field(default_factory=list)  # empty: any BodyPartExamined
    series_description: str = ""  # regex (search, case-insensitive); empty: any
    calling_ae: list[str] = Field(default_factory=list)  # empty: any allowed peer
    priority: Priority = Priority.ROUTINE
    destination: str = ""  # peer AE title for results; empty: the peer that sent the study

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return value

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values]


T_START_DEFAULTS = {"CT": 250, "CR": 25, "DX": 25}  # = inference.pipeline.PipelineSettings' (tested)
LAMBDA_DEFAULTS = {"CT": 8.0, "CR": 3.0, "DX": 3.0}
SegmentPolarity = Literal["both", "denser"]
# = inference.pipeline.PipelineSettings.segment_polarity
POLARITY_DEFAULTS: dict[str, SegmentPolarity] = {"CT": "denser", "CR": "both", "DX": "both"}
# Images per U-Net call when [inference] max_batch is unset, by the device the U-Net runs on: 28 is this CPU's best
# (larger batches within a few per cent), 560 cut the U-Net's share of a CT study from 0.57 to 0.19 s on an H200
# (benchmarks/RESULTS.md, "Per-study time at the node's defaults" in the GPU session). A Triton server's repository
# may have been written for 28 (`max_batch_size`): with backend "triton" the node sends the CPU's batches.
MAX_BATCH_DEFAULTS = {"cpu": 28, "cuda": 560}
MODEL_DEFAULTS = {"CT": "bundled", "CR": "bundled", "DX": "bundled"}  # the bundled model is trained for CT only
SCHEDULE_T = 1000  # the diffusion schedule's length, = inference.pipeline.PipelineSettings.schedule_T


class InferenceSettings(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "torch", "onnxruntime", "openvino", "tensorrt", "triton"] = "auto"  # triton: see [triton]
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    ensemble: int = Field(7, ge=1, le=64)
    # Per modality, like t_start: "bundled" or a path to a .safetensors file; a plain string means every modality.
    # A model only ever analyses the modalities its metadata says it was trained for (node/models.py).
    # NoDecode: EDGENODE_INFERENCE__MODEL=/path arrives as the plain string (not parsed as JSON); a table from the
    # environment is JSON ({"CR": "/path"}) or one variable per key (EDGENODE_INFERENCE__MODEL__CR).
    model: Annotated[dict[str, str], NoDecode] = Field(default_factory=lambda: dict(MODEL_DEFAULTS))
    steps: int = Field(5, ge=1)  # reverse-process U-Net calls per member (docs/method.md: 5 scores as 10)
    t_start: dict[str, int] = Field(default_factory=lambda: dict(T_START_DEFAULTS))
    # A mixed-depth ensemble for the modalities named (docs/method.md): every other member starts this deep, between
    # t_start and T, e.g. {CT = 550}; the model must have been trained that deep. Empty: every member from t_start.
    deep_t_start: dict[str, int] = Field(default_factory=dict)
    threshold_lambda: dict[str, float] = Field(default_factory=lambda: dict(LAMBDA_DEFAULTS))
    # What the SEG outlines, per modality: "denser" (opacities: only voxels denser than the pseudo-healthy
    # reconstruction) or "both"; the study and slice scores always count both (docs/method.md).
    segment_polarity: dict[str, SegmentPolarity] = Field(default_factory=lambda: dict(POLARITY_DEFAULTS))
    # Images per U-Net call; unset: by the device the U-Net runs on (MAX_BATCH_DEFAULTS). CUDA out-of-memory halves it.
    max_batch: int | None = Field(None, ge=1)
    # The CT lung mask's learned refinement (inference/lung_refiner.py: takes in lung filled by opacities, which the
    # threshold mask leaves out): "bundled", a path to a refiner .safetensors, or "off" (the threshold mask alone).
    lung_refiner: str = "bundled"
    seed: int = 0
    min_ct_slices: int = Field(3, ge=1)  # fewer usable slices (damaged ones left out): the CT series is skipped
    workers: int = Field(1, ge=0)  # worker processes (worker i on GPU i mod count); 0 = this node runs no inference

    def batch_on(self, device: str) -> int:
        """Images per U-Net call on `device` ("cpu" or "cuda"): `max_batch` when set, else the device's default."""
        if self.max_batch is not None:
            return self.max_batch
        return MAX_BATCH_DEFAULTS["cpu" if self.backend == "triton" else device]

    @field_validator("t_start", "threshold_lambda", "segment_polarity", "model", mode="before")
    @classmethod
    def _per_modality(cls, value: object, info: ValidationInfo) -> object:
        """A partial table changes only the modalities it names (`t_start = {CR = 200}` keeps CT's and DX's
        defaults); keys are case-insensitive (environment variables arrive lower-case) and must be CT/CR/DX.
        `model` may also be a plain string: that model for every modality."""
        if info.field_name == "model" and isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON table of modality -> model: {exc}") from exc
        if info.field_name == "model" and isinstance(value, str | Path):
            if not str(value).strip():
                raise ValueError('empty: give "bundled" or a path to a .safetensors file')
            return {m: str(value) for m in MODEL_DEFAULTS}
        if not isinstance(value, dict):
            return value  # pydantic names the type error
        per_field: dict[str, dict[str, Any]] = {
            "t_start": T_START_DEFAULTS,
            "threshold_lambda": LAMBDA_DEFAULTS,
            "segment_polarity": POLARITY_DEFAULTS,
        }
        defaults = per_field.get(str(info.field_name), MODEL_DEFAULTS)
        merged: dict[str, object] = dict(defaults)
        for key, item in value.items():
            modality = str(key).strip().upper()
            if modality not in defaults:
                raise ValueError(f"unknown modality {key!r}: the keys are CT, CR and DX")
            merged[modality] = item
        if info.field_name == "t_start":  # (a value that is no integer at all is pydantic's to report)
            outside = {
                m: t for m, t in merged.items() if str(t).lstrip("-").isdigit() and not 0 <= int(str(t)) < SCHEDULE_T
            }
            if outside:
                raise ValueError(f"{outside}: t_start must be 0..{SCHEDULE_T - 1} (the schedule's T = {SCHEDULE_T})")
        if info.field_name == "model":
            empty = [m for m, v in merged.items() if not isinstance(v, str) or not v.strip()]
            if empty:
                raise ValueError(f'no model given for {", ".join(empty)}: "bundled" or a path to a .safetensors file')
        return merged

    @field_validator("lung_refiner")
    @classmethod
    def _refiner_named(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError('empty: give "bundled", "off" or a path to a lung refiner .safetensors file')
        return "off" if value.lower() == "off" else value

    @field_validator("deep_t_start", mode="before")
    @classmethod
    def _deep_per_modality(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value  # pydantic names the type error
        table = {str(key).strip().upper(): depth for key, depth in value.items()}
        unknown = sorted(set(table) - set(T_START_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown modality {unknown[0]!r}: the keys are CT, CR and DX")
        return table

    @model_validator(mode="after")
    def _deep_between_t_start_and_schedule(self) -> InferenceSettings:
        if self.deep_t_start and self.ensemble < 2:
            raise ValueError(f"deep_t_start {self.deep_t_start} needs ensemble >= 2 (members alternate depths)")
        wrong = {m: d for m, d in self.deep_t_start.items() if not self.t_start[m] < d < SCHEDULE_T}
        if wrong:
            raise ValueError(
                f"deep_t_start {wrong}: each must lie above that modality's t_start ({self.t_start}) and below "
                f"the schedule's T = {SCHEDULE_T}"
            )
        return self

    def model_for(self, modality: str) -> str:
        """The configured model source ("bundled" or a path) for a modality."""
        return self.model.get(modality.upper(), self.model["CT"])

    @model_validator(mode="after")
    def _one_model_on_triton(self) -> InferenceSettings:
        # A Triton pool serves one model ([triton] model_name), so every modality must name the same one there.
        if self.backend == "triton" and len(set(self.model.values())) > 1:
            raise ValueError(
                f"model: the triton backend serves one model ([triton] model_name), but the table names "
                f"{len(set(self.model.values()))}: {self.model}; use one model or another backend"
            )
        return self


class TritonSettings(Section):
    """Where `[inference] backend = "triton"` sends the U-Net calls: a Triton Inference Server's gRPC endpoint."""

    url: str = "127.0.0.1:8001"  # host:port of Triton's gRPC endpoint (no scheme)
    model_name: str = "edgenode-unet"  # as written by `edgenode engine build --triton-repo`
    model_version: str = ""  # empty: the version Triton serves as latest
    timeout_seconds: float = Field(30.0, gt=0)  # per request; slower counts as unavailable (the job is retried)
    in_flight: int = Field(4, ge=1)  # concurrent requests per worker, for Triton's dynamic batcher to merge
    micro_batch: int = Field(0, ge=0)  # images per request; 0: each U-Net call split evenly over in_flight
    tls: bool = False
    root_ca: Path | None = None  # PEM CA bundle for the server's certificate (unset: the system's roots)
    client_cert: Path | None = None  # PEM client certificate and key, for a server that requires mutual TLS
    client_key: Path | None = None

    @field_validator("url")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.strip().rpartition(":")
        if "://" in value or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port (Triton's gRPC endpoint, e.g. triton.example:8001)")
        return value.strip()

    @model_validator(mode="after")
    def _tls_files(self) -> TritonSettings:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be set together")
        if not self.tls and (self.root_ca or self.client_cert):
            raise ValueError("root_ca / client_cert are for TLS: set tls = true")
        return self


class ResultsSettings(Section):
    heatmap_slices: int = Field(5, ge=0)  # top-N slices by score; 0 = all
    seg_all_slices: bool = False
    fractional_anomaly_seg: bool = False
    fractional_uncertainty_seg: bool = False
    empty_seg: bool = False  # negative result: write an all-empty BINARY SEG too (default: SEG omitted, SR says absent)


class SendSettings(Section):
    initial_backoff_seconds: float = Field(30.0, gt=0)
    max_backoff_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(20, ge=1)
    interval_seconds: float = Field(2.0, gt=0)  # how often the sender looks for due items
    # A sender's claim on the items it is sending, renewed after each file; a dead sender's items are taken over
    # by another once it runs out. Must outlast the longest wait for one file (node.*_timeout).
    lease_seconds: float = Field(300.0, gt=0)


class JobSettings(Section):
    lease_seconds: float = Field(120.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> JobSettings:
        # A renewal must land well before the lease runs out, or every long job is taken away from its worker.
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most half of lease_seconds "
                f"({self.lease_seconds:g})"
            )
        return self


class WebSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""  # empty: generated at first start, stored under data_dir, printed once
    worklist_limit: int = Field(500, ge=1)  # rows on the dashboard worklist and the API default


class RetentionSettings(Section):
    enabled: bool = True
    days: int = Field(30, ge=1)
    interval_minutes: float = Field(60.0, gt=0)  # how often the scheduler runs the cleanup


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """Everything the node needs to know, passed down explicitly."""

    model_config = SettingsConfigDict(
        env_prefix="EDGENODE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    peers: list[PeerSettings] = Field(default_factory=list)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    stability: StabilitySettings = Field(default_factory=StabilitySettings)
    routing: list[RoutingRule] = Field(default_factory=lambda: [RoutingRule()])
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.stability.max_wait_seconds < self.stability.stable_seconds:
            raise ValueError("stability.max_wait_seconds must be >= stability.stable_seconds")
        longest_wait = self.node.network_timeout + self.node.acse_timeout + self.node.dimse_timeout
        if self.send.lease_seconds <= longest_wait:
            raise ValueError(
                f"send.lease_seconds ({self.send.lease_seconds:g}) must exceed node.network_timeout + "
                f"node.acse_timeout + node.dimse_timeout ({longest_wait:g}): a claim must outlast one file's send"
            )
        known = {p.ae_title for p in self.peers}
        for rule in self.routing:
            if rule.destination and rule.destination not in known:
                raise ValueError(f"routing rule {rule.name!r}: destination {rule.destination!r} is not in [[peers]]")
        return self

    # Derived paths: one place decides where things live under data_dir.
    @property
    def data_dir(self) -> Path:
        return self.node.data_dir.expanduser().resolve()

    @property
    def spool_dir(self) -> Path:
        if self.node.spool_dir is not None and str(self.node.spool_dir):
            return self.node.spool_dir.expanduser().resolve()
        return self.data_dir / "spool"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'edgenode.db'}"

    @model_validator(mode="after")
    def _name_checks_need_a_private_ca(self) -> Settings:
        unchecked = [p.ae_title for p in self.peers if p.tls and not p.tls_verify_name]
        if unchecked and self.node.tls_ca is None:
            raise ValueError(
                f"peers {unchecked}: tls_verify_name = false needs [node] tls_ca (a private CA); with the system's "
                "public CAs, any certificate for any host would be trusted"
            )
        return self

    def peer(self, ae_title: str) -> PeerSettings | None:
        return next((p for p in self.peers if p.ae_title == ae_title), None)


class ConfigError(Exception):
    """A configuration problem, with a message that names the offending key."""


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        env = "EDGENODE_" + "__".join(str(p).upper() for p in err["loc"] if not isinstance(p, int))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (input {err.get('input')!r}; env override {env})")
    return "\n".join(lines)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from an optional TOML file, the environment and explicit overrides."""
    if path is not None and not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    source = str(path) if path else "defaults and environment"
    try:
        loaded = _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"invalid configuration ({source}): {exc}") from exc
    return Settings.model_validate(loaded.model_dump())


def without_password(url: str) -> str:
    """A database URL fit for printing and logs: the password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: print nothing of it
        return "(unparseable database URL)"


def settings_to_toml(settings: Settings) -> str:
    """Render effective settings as TOML (for `edgenode config show`); hides the web token and database password."""
    data = settings.model_dump(mode="json")
    if data["web"]["token"]:
        data["web"]["token"] = "********"
    if data["database"]["url"]:
        data["database"]["url"] = without_password(data["database"]["url"])
    out: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if value is None:
            return '""'
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{k} = {scalar(v)}" for k, v in value.items()) + " }"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{section}]]")
                out.extend(f"{k} = {scalar(v)}" for k, v in item.items() if v is not None)
                out.append("")
        else:
            out.append(f"[{section}]")
            out.extend(f"{k} = {scalar(v)}" for k, v in body.items() if v is not None)
            out.append("")
    return "\n".join(out)
