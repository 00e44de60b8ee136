"""The node's configuration: one TOML file, validated, with environment overrides.

Precedence: keyword arguments > environment (``SPINEMED_<TABLE>__<KEY>``, e.g.
``SPINEMED_NODE__PORT=11113``) > the TOML file > defaults.  Every key is documented in
``docs/config.example.toml``.  Errors name the offending key (``node.port: ...``).
"""

from __future__ import annotations

import contextvars
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicom_node.errors import ConfigError
from dicom_node.ops_config import (
    AuditConfig,
    HttpConfig,
    RetentionConfig,
    StoreConfig,
    TLSConfig,
    check_networks,
    check_secret_file_mode,
)
from inference.settings import ModelSettings

__all__ = [
    "CompletenessConfig",
    "ConsultationConfig",
    "DestinationConfig",
    "ExportConfig",
    "NodeConfig",
    "NodeSection",
    "OutputConfig",
    "PriorsConfig",
    "RoutingConfig",
    "RoutingRule",
    "ShadowConfig",
    "WorkerConfig",
    "load_config",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def _check_ae(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable ASCII characters, no backslash, not all spaces")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(_Section):
    """``[node]``: the listener."""

    ae_title: str = "SPINEMED"
    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=11112, ge=0, le=65535, description="0 = any free port")
    data_dir: Path = Path("/var/lib/spinemed-node")
    max_associations: int = Field(default=32, ge=1, le=512, description="established associations at once")
    max_pending_connections: int = Field(
        default=64, ge=1, le=4096,
        description="connections still awaiting their A-ASSOCIATE-RQ (each holds a thread for at most "
                    "acse_timeout_s); more are closed at once, so idle or slow peers cannot lock others out")
    max_pending_per_source: int = Field(
        default=16, ge=1, le=4096,
        description="of those, from one source address (a PACS may open a dozen associations at once)")
    allowed_calling_aes: list[str] = Field(default_factory=list, description="empty = any")
    acse_timeout_s: float = Field(
        default=30.0, gt=0, description="ARTIM: the whole TLS handshake and A-ASSOCIATE-RQ must arrive within it")
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(
        default=60.0, gt=0, description="within an association: the longest wait for one whole PDU")
    min_free_disk_mb: int = Field(default=1024, ge=0, description="refuse instances below this")
    receive_slots: int = Field(default=512, ge=0, le=100_000,
                               description="instances received into files written ahead (1 MiB of disk each, "
                                           "kept ready); size it to a study burst; 0 = off")
    allowed_source_networks: list[str] = Field(
        default_factory=list, description="CIDRs peers may connect from; empty = any"
    )

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_aes(cls, v: list[str]) -> list[str]:
        return [_check_ae(a) for a in v]

    @field_validator("allowed_source_networks")
    @classmethod
    def _check_networks(cls, v: list[str]) -> list[str]:
        return check_networks(v)


class CompletenessConfig(_Section):
    """``[completeness]``: when a study counts as fully received."""

    quiet_seconds: float = Field(default=60.0, ge=0, description="no new instance for this long")
    force_seconds: float = Field(default=1800.0, gt=0, description="complete anyway after this long")
    required_series: list[str] = Field(
        default_factory=list, description="regexes on series description that must all be present"
    )
    check_interval_s: float = Field(default=1.0, gt=0)

    @field_validator("required_series")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pattern in v:
            re.compile(pattern)
        return v

    @model_validator(mode="after")
    def _order(self) -> CompletenessConfig:
        if self.force_seconds < self.quiet_seconds:
            raise ValueError("force_seconds: must not be shorter than quiet_seconds")
        return self


Orientation = Literal["sagittal", "coronal", "axial", "projection", "any"]


class RoutingRule(_Section):
    """One ``[[routing.rules]]`` entry: a series feeds the model when it matches any rule."""

    name: str
    modalities: list[str] = Field(min_length=1)
    body_parts: list[str] = Field(
        default_factory=list, description="Body Part Examined values (case-insensitive)"
    )
    description_patterns: list[str] = Field(
        default_factory=list, description="regexes on study/series description / protocol name"
    )
    exclude_description_patterns: list[str] = Field(default_factory=list)
    orientations: list[Orientation] = Field(default_factory=lambda: list[Orientation](["any"]))

    @field_validator("description_patterns", "exclude_description_patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
        return v

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [s.strip().upper() for s in v]


def _default_rules() -> list[RoutingRule]:
    spine_words = r"(?i)(spine|spinal|lumbar|thoracic|cervical|l-?spine|t-?spine|c-?spine|lws|bws|hws|scoli)"
    body_parts = ["SPINE", "LSPINE", "TSPINE", "CSPINE", "WHOLESPINE", "SSPINE", "COCCYX", "SACRUM"]
    return [
        RoutingRule(
            name="spine MR",
            modalities=["MR"],
            body_parts=body_parts,
            description_patterns=[spine_words],
            exclude_description_patterns=[r"(?i)(localizer|scout|survey|3-?plane)"],
            orientations=["sagittal", "axial"],
        ),
        RoutingRule(
            name="spine CT",
            modalities=["CT"],
            body_parts=body_parts,
            description_patterns=[spine_words],
            exclude_description_patterns=[r"(?i)(localizer|scout|topogram|dose)"],
            orientations=["axial"],
        ),
        RoutingRule(
            name="spine radiograph",
            modalities=["CR", "DX"],
            body_parts=body_parts,
            description_patterns=[spine_words],
            orientations=["any"],
        ),
    ]


class RoutingConfig(_Section):
    """``[routing]``: which series feed the model."""

    dry_run: bool = Field(default=False, description="run the model and write results, export nothing")
    rules: list[RoutingRule] = Field(default_factory=_default_rules)


class DestinationConfig(_Section):
    """One ``[[destinations]]`` entry: where our results go.

    ``type = "dicom"`` (default): a C-STORE SCP (``ae_title``, ``host``, ``port``).
    ``type = "dicomweb"``: a STOW-RS endpoint (``url``, e.g. ``http://orthanc:8042/dicom-web``).
    ``type = "hl7"``: a RIS/EHR interface engine taking HL7 v2.5.1 ORU^R01 over MLLP (``host``, ``port``).
    ``type = "fhir"``: a FHIR R4 server taking a transaction Bundle (``url``: its base, e.g.
    ``https://ehr.example/fhir``).

    The DICOM types send every result object; ``hl7`` and ``fhir`` carry the two SRs' content (findings
    and narrative) as one message per report (:data:`REPORT_KINDS`).
    """

    name: str = Field(min_length=1, max_length=64)
    type: Literal["dicom", "dicomweb", "hl7", "fhir"] = "dicom"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = Field(default=None, description="DICOMweb base URL (type = dicomweb)")
    username: str | None = Field(default=None, description="DICOMweb basic-auth user")
    password_env: str | None = Field(default=None, description="env var holding the DICOMweb password")
    tls: bool = Field(default=False, description="DICOM TLS to this destination (type = dicom)")
    tls_ca_file: Path | None = Field(default=None, description="CA bundle to verify it; default: system")
    tls_cert_file: Path | None = Field(default=None, description="our client certificate, if it wants one")
    tls_key_file: Path | None = Field(default=None, description="the client certificate's key")
    tls_server_name: str | None = Field(default=None, description="name in its certificate; default host")
    token_env: str | None = Field(default=None, description="env var holding a bearer token (type = fhir)")
    hl7_sending_application: str = Field(default="SPINEMED", min_length=1, max_length=180,
                                         description="MSH-3 (type = hl7)")
    hl7_sending_facility: str | None = Field(default=None, max_length=180, description="MSH-4 (type = hl7)")
    hl7_receiving_application: str | None = Field(default=None, max_length=180, description="MSH-5 (type = hl7)")
    hl7_receiving_facility: str | None = Field(default=None, max_length=180, description="MSH-6 (type = hl7)")
    patient_identifier_system: str | None = Field(
        default=None, max_length=256,
        description="the FHIR identifier system (a URI) of the site's Patient IDs (type = fhir); "
                    "default: the DICOM Issuer of Patient ID as urn:oid, else none")

    @field_validator("ae_title")
    @classmethod
    def _v_ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae(v)

    @model_validator(mode="after")
    def _complete(self) -> DestinationConfig:
        if self.type in ("dicom", "hl7"):
            needed = ("ae_title", "host", "port") if self.type == "dicom" else ("host", "port")
            missing = [k for k in needed if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{', '.join(missing)}: required for a {self.type} destination")
        elif not self.url or not re.match(r"^https?://", self.url):
            raise ValueError(f"url: a {self.type} destination needs an http(s) URL")
        for key in ("hl7_sending_application", "hl7_sending_facility", "hl7_receiving_application",
                    "hl7_receiving_facility"):
            value = getattr(self, key)
            if value is not None and re.search(r"[|^~\\&\r\n]", value):
                raise ValueError(f"{key}: HL7 delimiters (| ^ ~ \\ &) and line breaks are not allowed")
        return self

    @property
    def output_kinds(self) -> frozenset[str] | None:
        """The kinds of result object this destination takes (``None``: all of them)."""
        return REPORT_KINDS if self.type in ("hl7", "fhir") else None


#: the result objects a message-based destination (HL7 v2, FHIR) is built from: both SRs
REPORT_KINDS = frozenset({"measurement_report", "narrative_report"})


class ExportConfig(_Section):
    """``[export]``: delivery retries."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_initial_s: float = Field(default=5.0, ge=0)
    backoff_max_s: float = Field(default=900.0, ge=0)
    calling_ae_title: str | None = Field(default=None, description="default: node.ae_title")
    timeout_s: float = Field(default=60.0, gt=0)


EndEventName = Literal["done", "failed", "skipped"]


def _all_end_events() -> list[EndEventName]:
    return ["done", "failed", "skipped"]


class NotifyConfig(_Section):
    """``[notify]``: a webhook told when a study ends (done, failed, skipped), HMAC-signed JSON.

    Without ``include_identifiers`` the payload names the study only by its pseudonym (the same keyed hash
    as the logs); the reason texts carry no patient data.
    """

    webhook_url: str | None = Field(default=None, description="http(s) URL that receives the POSTs; unset: off")
    secret_env: str | None = Field(default=None, description="env var holding the HMAC-SHA256 signing key")
    events: list[EndEventName] = Field(default_factory=_all_end_events, min_length=1)
    include_identifiers: bool = Field(default=False, description="add the Study Instance UID to each payload")
    timeout_s: float = Field(default=10.0, gt=0)
    poll_interval_s: float = Field(default=2.0, gt=0, description="how often ended studies are looked for")
    backoff_initial_s: float = Field(default=5.0, ge=0, description="first wait after a failed POST")
    backoff_max_s: float = Field(default=300.0, ge=0, description="longest wait; notifications wait, never drop")

    @field_validator("webhook_url")
    @classmethod
    def _v_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s]+$", v):
            raise ValueError("must be an http(s) URL")
        return v

    @model_validator(mode="after")
    def _signed(self) -> NotifyConfig:
        if self.webhook_url and not self.secret_env:
            raise ValueError("secret_env: a webhook is signed; name the env var holding its key")
        return self


class PriorsConfig(_Section):
    """``[priors]``: compare each study with the patient's last one on the site's PACS.

    The PACS is a ``[[destinations]]`` entry of type ``dicom`` (it must know our AE title and allow C-FIND
    and C-GET) or ``dicomweb`` (QIDO-RS and WADO-RS under its url) named by ``source`` (docs/priors.md).
    A prior that cannot be found or fetched never holds a report back: the report is made without
    comparison and says why.
    """

    source: str | None = Field(default=None, description="name of a dicom or dicomweb destination; unset: off")
    max_count: int = Field(default=3, ge=1, le=20, description="earlier studies looked at, newest first")
    max_age_days: int = Field(default=1825, ge=1, description="how far back a prior may be")
    timeout_s: float = Field(default=30.0, gt=0, description="TCP connect, ACSE and DIMSE timeout")


class CodeSpec(_Section):
    """One coded concept of a site's terminology: ``{ scheme = "SCT", value = "...", meaning = "..." }``."""

    scheme: str = Field(min_length=1, max_length=16, pattern=r"^[A-Z0-9._-]+$")
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class OutputConfig(_Section):
    """``[output]``: the DICOM objects we write."""

    institution_name: str | None = None
    institution_department_name: str | None = None
    series_number: int = Field(default=9901, ge=1, le=2**31 - 4)
    key_image: bool = True
    pdf: bool = Field(default=False, description="also an Encapsulated PDF of the report (its own series)")
    uid_prefix: str | None = Field(default=None, description="site UID root ending in '.'")
    codes: dict[str, CodeSpec] = Field(
        default_factory=dict,
        description='site terminology, e.g. "finding.modic_change" = { scheme, value, meaning } (docs/codes.md)',
    )

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: dict[str, CodeSpec]) -> dict[str, CodeSpec]:
        from sr_templates.codes import override_keys

        unknown = sorted(set(v) - set(override_keys()))
        if unknown:
            raise ValueError(f"unknown concept(s) {', '.join(unknown)}: see docs/codes.md for the keys")
        return v

    @field_validator("uid_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and (not re.fullmatch(r"[0-9.]+\.", v) or len(v) > 40):
            raise ValueError("must be digits and dots, end with '.', at most 40 characters")
        return v


class WorkerConfig(_Section):
    """``[worker]``: the job loop."""

    poll_interval_s: float = Field(default=0.5, gt=0)
    lease_seconds: float = Field(default=1800.0, gt=0, description="a job claimed longer is reclaimed")
    model_max_attempts: int = Field(
        default=12, ge=1, le=1000, description="analyses tried while the model is down before the job fails"
    )
    model_backoff_initial_s: float = Field(default=30.0, ge=0, description="first wait after a transient model error")
    model_backoff_max_s: float = Field(default=1800.0, ge=0, description="longest wait between analyses")
    export_threads: int = Field(
        default=1, ge=0, le=8,
        description="threads sending results while the model analyses the next study; 0: send before the next",
    )
    analysis_threads: int = Field(
        default=1, ge=1, le=32,
        description="studies analysed side by side: for a model server that batches concurrent requests (openai "
                    "backend, vLLM), or an in-process model decoding [model] max_batch studies at once; with "
                    "max_batch 1 an in-process model is used by one study at a time",
    )


class ConsultationConfig(_Section):
    """``[consultation]``: follow-up questions about an analysed study, answered by the worker's model."""

    enabled: bool = Field(default=True, description="the consultation page and API")
    max_turns: int = Field(default=20, ge=1, le=1000, description="questions per study, all consultations")
    token_budget: int = Field(default=200_000, ge=1, description="prompt + answer tokens per study")
    max_answer_tokens: int = Field(default=512, ge=1, le=8192, description="longest answer, in tokens")
    max_question_chars: int = Field(default=2000, ge=1, le=20_000, description="longest question")
    busy_timeout_s: float = Field(default=30.0, gt=0, description="a question no worker took this long: busy")
    answer_timeout_s: float = Field(default=600.0, gt=0, description="the page stops waiting for an answer")
    observer_name: str = Field(default="Consultant", min_length=1, max_length=64,
                               description="person observer of a saved consultation when no user is named")
    user_header: str | None = Field(
        default=None, pattern=r"^[A-Za-z][A-Za-z0-9-]*$",
        description="header in which the site's authenticating proxy names the user (e.g. X-Remote-User)")
    series_number: int = Field(default=9905, ge=1, le=2**31 - 4, description="series of saved consultations")


class ShadowConfig(_Section):
    """``[shadow]``: agreement of the node's findings with the site's own results (docs/validation.md)."""

    labels_dir: Path | None = Field(
        default=None, description="watched folder of per-level label CSVs (None: shadow mode off)")
    poll_s: float = Field(default=10.0, gt=0, le=3600, description="how often the worker looks into labels_dir")
    wait_s: float = Field(default=86400.0, ge=0,
                          description="a file naming studies not yet analysed waits this long for them")


_TOML_PATH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_TOML_PATH", default=None)


class NodeConfig(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="SPINEMED_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    node: NodeSection = Field(default_factory=NodeSection)
    completeness: CompletenessConfig = Field(default_factory=CompletenessConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    export: ExportConfig = Field(default_factory=ExportConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    priors: PriorsConfig = Field(default_factory=PriorsConfig)
    model: ModelSettings = Field(default_factory=ModelSettings)
    output: OutputConfig = Field(default_factory=OutputConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    consultation: ConsultationConfig = Field(default_factory=ConsultationConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

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
        path = _TOML_PATH.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _unique_destinations(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destinations: duplicate name(s) {', '.join(dupes)}")
        if self.priors.source is not None:
            source = next((d for d in self.destinations if d.name == self.priors.source), None)
            if source is None:
                raise ValueError(f"priors.source: no destination named {self.priors.source!r}")
            if source.type not in ("dicom", "dicomweb"):
                raise ValueError(f"priors.source: {source.name!r} is a {source.type} destination; priors are "
                                 "queried over DICOM (C-FIND, C-GET) or DICOMweb (QIDO-RS, WADO-RS)")
        if self.model.backend != "openai" and self.model.max_batch > self.worker.analysis_threads:
            raise ValueError(f"model.max_batch: {self.model.max_batch} studies per batch, but only "
                             f"worker.analysis_threads = {self.worker.analysis_threads} bring studies to the model "
                             "at once; set analysis_threads to at least max_batch")
        return self

    @property
    def priors_source(self) -> DestinationConfig | None:
        """The ``[priors] source`` destination, or ``None`` when comparison with priors is off."""
        return next((d for d in self.destinations if d.name == self.priors.source), None)

    # ------------------------------------------------------------------ derived paths
    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def outputs_dir(self) -> Path:
        return self.node.data_dir / "outputs"

    @property
    def db_path(self) -> Path:
        return self.node.data_dir / "jobs.sqlite3"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.node.data_dir / "audit" / "audit.jsonl"

    @property
    def model_dir(self) -> Path:
        if self.model.path is not None:
            return self.model.path
        return self.node.data_dir / "models" / "demo"


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        got_s = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{got_s}")
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> NodeConfig:
    """Load and validate the configuration.

    Parameters
    ----------
    path
        A TOML file; ``None`` for the embedded defaults (plus environment overrides).
    **overrides
        Top-level tables given in code (tests, the demo), e.g. ``node={"port": 0}``.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a value is invalid.  The message names each bad key.
    """
    toml_path: Path | None = None
    if path is not None:
        toml_path = Path(path)
        if not toml_path.is_file():
            raise ConfigError(f"config file {toml_path} does not exist")
        try:
            with toml_path.open("rb") as fh:
                raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {toml_path} is not valid TOML: {exc}") from exc
        check_secret_file_mode(toml_path, raw)
    token = _TOML_PATH.set(toml_path)
    try:
        return NodeConfig(**overrides)
    except ValidationError as exc:
        raise ConfigError(
            _format_errors(exc, str(toml_path) if toml_path else "defaults/environment")
        ) from exc
    finally:
        _TOML_PATH.reset(token)
