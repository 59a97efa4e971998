"""Shared building blocks of every stage's configuration.

These models are the single source of truth for what a user may write in a resource's
``spec``. The operator side (``crucible.api``) composes them with placement and scheduling;
the trainer parses the spec JSON it is handed with the same models. Nothing here imports
torch, so the operator image stays slim.

Field names are snake_case in Python and camelCase on the wire (``populate_by_name``), as
Kubernetes resources are.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

KINDS = ("DataPipeline", "PretrainRun", "FinetuneRun", "PreferenceRun", "QuantizeJob")
Kind = Literal["DataPipeline", "PretrainRun", "FinetuneRun", "PreferenceRun", "QuantizeJob"]

# Exit status contract between the trainer and both backends (documented in docs/architecture.md):
EXIT_OK = 0
EXIT_APPLICATION_ERROR = 1  # a bug or a bad config: never restarted
EXIT_BAD_INPUT = 2  # the spec or an input file is wrong: never restarted
EXIT_RETRIABLE = 75  # EX_TEMPFAIL: NCCL/GPU/storage fault or hang detected by the trainer: restart

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
INT64_MAX = 2**63 - 1
"""Kubernetes stores integers as int64; anything larger is a mistake (and overflows torch, numpy, timers)."""
MAX_DURATION_SECONDS = 7 * 24 * 3600
"""The longest duration a spec may give (a week): longer waits are typos, and overflow timers."""
_URI_SCHEMES = ("s3://",)


class StrictModel(BaseModel):
    """Base of every spec model: unknown fields are errors, the wire format is camelCase."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        validate_default=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: Any, info: ValidationInfo) -> Any:
        """Every integer fits in int64 (as the CRD stores it); a 70-digit seed is a typo, not a seed."""
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else (value,):
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > INT64_MAX:
                raise ValueError(f"{item} does not fit in a 64-bit integer (at most {INT64_MAX})")
        return value

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def parse_duration(text: str) -> int:
    """Seconds in a Go-style duration such as ``90s``, ``30m`` or ``1h30m``."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"{text!r} is not a duration; write it like 90s, 30m or 1h30m")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total > MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is longer than a week ({MAX_DURATION_SECONDS // 3600}h), the longest duration allowed")
    return total


def check_uri(value: str | None, what: str = "uri") -> str | None:
    """A local path or ``s3://bucket[/prefix]``; refuses the filesystem root, bare schemes and other schemes."""
    if value is None:
        return value
    text = value.strip()
    if text != value or not text:
        raise ValueError(f"{value!r} has leading or trailing spaces; remove them")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower() + "://"
        if scheme not in _URI_SCHEMES:
            raise ValueError(f"{value!r}: {scheme} is not supported; use a local path or s3://bucket/prefix")
        bucket = text[len(scheme):].split("/", 1)[0]
        if not bucket:
            raise ValueError(f"{value!r} names no bucket; write s3://bucket/prefix")
        return value
    if text.strip("/") == "" or text in (".", "~", "~/"):
        raise ValueError(f"{value!r} is the root of a filesystem or home folder; name a folder or file inside it")
    if "\x00" in text:
        raise ValueError("contains a NUL character")
    return value


Duration = str
DURATION_PATTERN = r"^([0-9]{1,4}h)?([0-9]{1,6}m)?([0-9]{1,8}s)?$"


class RunRef(StrictModel):
    """Another Crucible resource whose ``status.outputURI`` this one consumes."""

    kind: Kind = Field(description="Kind of the referenced resource.")
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="metadata.name of the referenced resource, in the same namespace.",
    )


class InputRef(StrictModel):
    """Where an input comes from: the output of another run (``fromRun``) or a plain URI.

    Exactly one of the two is set. A URI is a local path (embedded mode, PVC mounts) or
    ``s3://bucket/prefix``.
    """

    from_run: RunRef | None = Field(
        default=None,
        description="Use the outputURI of this run once it has Succeeded.",
    )
    uri: str | None = Field(
        default=None,
        min_length=1,
        description="A local path, a PVC mount path, or s3://bucket/prefix.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return check_uri(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> InputRef:
        if (self.from_run is None) == (self.uri is None):
            raise ValueError("set exactly one of fromRun or uri")
        return self


class S3Config(StrictModel):
    """How to reach S3-compatible storage. Credentials only ever come from a Secret."""

    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint, e.g. https://minio.storage:9000; empty for AWS."
    )
    region: str | None = Field(default=None, description="Region name, e.g. us-east-1.")
    credentials_secret: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "Name of a Secret in the resource's namespace with keys AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, exposed to the pods as environment variables. Empty: "
            "use the pod's ambient identity (IRSA, workload identity)."
        ),
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="S3 addressing style; MinIO usually wants path."
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL such as https://minio.storage:9000")
        if parts.username or parts.password or "@" in parts.netloc:
            raise ValueError(
                "the URL carries credentials (user:password@); they would be stored in plain text in the resource "
                "and the pods' environment. Remove them and set credentialsSecret to a Secret with keys "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: an endpoint has no query or fragment (signed URLs are credentials)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_inline_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = sorted(
                k
                for k in data
                if k.lower().replace("_", "")
                in {"accesskeyid", "secretaccesskey", "sessiontoken", "accesskey", "secretkey"}
            )
            if inline:
                raise ValueError(
                    f"inline credentials ({', '.join(inline)}) are not allowed: store them in a "
                    "Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and set "
                    "credentialsSecret to its name"
                )
        return data


class StorageConfig(StrictModel):
    """Object storage settings shared by every URI in the spec."""

    s3: S3Config | None = Field(default=None, description="S3 settings for s3:// URIs.")


class OutputConfig(StrictModel):
    """Where the stage writes its result. Empty: the operator derives one from its storage root."""

    uri: str | None = Field(
        default=None, min_length=1, description="Output location: local path or s3://bucket/prefix."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return check_uri(value)


class FailurePolicy(StrictModel):
    """How infrastructure faults are survived. Application errors never restart."""

    max_restarts: int = Field(
        default=3, ge=0, le=1000, description="Restarts allowed after infrastructure failures."
    )
    backoff_seconds: int = Field(
        default=30, ge=0, le=3600, description="Delay before the first restart; doubles each time."
    )
    max_backoff_seconds: int = Field(
        default=600, ge=0, le=86400, description="Upper bound of the restart delay."
    )
    exclude_failed_nodes: bool = Field(
        default=True, description="Keep the next attempt off nodes that failed an earlier one."
    )
    hang_timeout: Duration = Field(
        default="30m",
        pattern=DURATION_PATTERN,
        description="No step progress for this long counts as a hang (e.g. 30m, 1h).",
    )
    failure_rate_per_hour: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Expected infrastructure failures per hour for the whole job, used by the automatic "
            "checkpoint interval (Young/Daly). Empty: estimated from observed restarts."
        ),
    )

    @field_validator("hang_timeout")
    @classmethod
    def _hang_timeout(cls, value: str) -> str:
        if parse_duration(value) < 10:
            raise ValueError("must be at least 10s")
        return value

    @property
    def hang_timeout_seconds(self) -> int:
        return parse_duration(self.hang_timeout)

    @model_validator(mode="after")
    def _backoff_order(self) -> FailurePolicy:
        if self.max_backoff_seconds < self.backoff_seconds:
            raise ValueError(
                "maxBackoffSeconds: must be at least backoffSeconds "
                f"({self.max_backoff_seconds} < {self.backoff_seconds})"
            )
        return self


class MetricsConfig(StrictModel):
    """Rank 0's Prometheus endpoint and step log."""

    port: int = Field(default=9400, ge=0, le=65535, description="Port of /metrics; 0 turns it off.")
    log_every: int = Field(
        default=10, ge=1, le=1_000_000,
        description="Print a step line to the log every N steps (metrics.jsonl and the gauges get every step).",
    )
