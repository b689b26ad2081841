"""The prompt-record format of the registry topic (``hpad.prompts``): what one record holds and how it is read.

Record: key = category, value = artifact bytes (`hpad.artifact`), headers ``hpad-prompt-version``,
``hpad-prompt-sha256``, ``hpad-model-identity``. The writer (`tuner.registry.PromptRegistry`) encodes records
with `record_headers`; every reader (the scorers' `consumers.prompt_provider.KafkaPromptProvider`, the tuner,
``hpad prompts``) decodes them with `parse_record`, which verifies the artifact and keeps a failure as data.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpad.artifact import PromptArtifact, read_artifact
from hpad.attention import LAAConfig
from hpad.errors import ArtifactError

VERSION_HEADER = "hpad-prompt-version"
SHA_HEADER = "hpad-prompt-sha256"
IDENTITY_HEADER = "hpad-model-identity"


@dataclass(frozen=True)
class RegistryRecord:
    """One record of the prompts topic; ``artifact`` is None when it failed verification (``error`` says why)."""

    category: str
    version: int
    partition: int
    offset: int
    timestamp_ms: int
    artifact: PromptArtifact | None
    error: str | None
    value: bytes
    reason: str | None = None  # ArtifactError.reason when verification failed


def record_headers(artifact: PromptArtifact) -> list[tuple[str, bytes]]:
    return [
        (VERSION_HEADER, str(artifact.version).encode()),
        (SHA_HEADER, artifact.sha256.encode()),
        (IDENTITY_HEADER, artifact.prompts.model_identity.encode()),
    ]


def parse_record(record, expected_identity: str | None = None, expected_laa: LAAConfig | None = None) -> RegistryRecord:
    """A consumed prompts-topic record -> RegistryRecord (verification failures are kept, not raised)."""
    category = record.key.decode("utf-8", "replace") if record.key else ""
    headers = {k: v for k, v in (record.headers or [])}
    try:
        header_version = int(headers.get(VERSION_HEADER, b"-1"))
    except ValueError:
        header_version = -1
    artifact, error, reason = None, None, None
    try:
        artifact = read_artifact(record.value or b"", expected_identity=expected_identity, expected_laa=expected_laa,
                                 expected_category=category or None)
        if header_version not in (-1, artifact.version):
            raise ArtifactError(f"header version {header_version} != manifest version {artifact.version}")
        if headers.get(SHA_HEADER) not in (None, artifact.sha256.encode()):
            raise ArtifactError("header sha256 does not match the artifact's checksum")
    except ArtifactError as exc:
        artifact, error, reason = None, str(exc), exc.reason
    version = artifact.version if artifact is not None else header_version
    return RegistryRecord(category, version, record.partition, record.offset, record.timestamp,
                          artifact, error, record.value or b"", reason)
