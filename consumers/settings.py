"""Settings of the hpad services: the only place in a process that reads the environment.

One frozen pydantic-settings class per process: `WorkerSettings` for ``hpad serve`` and `CameraSettings` for
``hpad camera``. Both read ``HPAD_*`` environment variables and a ``.env`` file in the working directory;
command-line flags (built from the fields by `add_cli_flags`) override both. Secrets are `SecretStr` and never
appear in ``repr`` or logs. Everything is validated when the process starts, with messages that name the
environment variable to fix.

Also here, because they are pure functions of the settings: the keyword arguments for kafka-python's
``KafkaConsumer`` / ``KafkaProducer`` (security options go to both) and the markdown table of every setting
that ``README.md`` embeds (`settings_table`).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumers.contract import parse_tiling
from hpad.defaults import DEFAULT_MODEL, default_pretrained_tag
from hpad.errors import ConfigError, FrameError
from hpad.tiling import TilingPolicy

ENV_PREFIX = "HPAD_"
MiB = 1024 * 1024
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
MaskPolicy = Literal["anomalous", "always", "never"]
Precision = Literal["fp32", "bf16", "fp16"]
Compression = Literal["none", "gzip"]
DecodeScale = Literal["auto", "full"]
Runtime = Literal["torch", "onnxruntime", "openvino"]
RuntimePrecision = Literal["fp32", "bf16", "int8"]


def split_csv(value: object) -> object:
    """``"bottle, widget"`` -> ``["bottle", "widget"]`` (lists pass through)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class KafkaSettings(BaseSettings):
    """Broker address and security options shared by every hpad service (consumer and producer alike)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", frozen=True, extra="ignore",
        validate_default=True,
    )

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port")
    client_id: str = Field("hpad", description="Kafka client id (shown in broker logs and quotas)")
    security_protocol: SecurityProtocol = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    ssl_cafile: Path | None = Field(None, description="CA bundle (PEM) to verify the brokers")
    ssl_certfile: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="client private key (PEM) for mutual TLS")
    ssl_password: SecretStr | None = Field(None, description="password of the client private key")
    ssl_check_hostname: bool = Field(True, description="verify that the broker certificate matches its host name")
    sasl_mechanism: SaslMechanism | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_plain_username: SecretStr | None = Field(None, description="SASL user name")
    sasl_plain_password: SecretStr | None = Field(None, description="SASL password")
    request_timeout_ms: int = Field(30000, ge=1000, description="Kafka request timeout")

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs HPAD_SASL_MECHANISM")
        if self.sasl_mechanism is not None and not sasl:
            raise ValueError("HPAD_SASL_MECHANISM is set but HPAD_SECURITY_PROTOCOL is not SASL_PLAINTEXT/SASL_SSL")
        if sasl and (self.sasl_plain_username is None or self.sasl_plain_password is None):
            raise ValueError(f"SASL {self.sasl_mechanism} needs HPAD_SASL_PLAIN_USERNAME and HPAD_SASL_PLAIN_PASSWORD")
        uses_tls = self.security_protocol in ("SSL", "SASL_SSL")
        tls_files = [self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile]
        if not uses_tls and any(f is not None for f in tls_files):
            raise ValueError("HPAD_SSL_* files are set but HPAD_SECURITY_PROTOCOL is not SSL or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("HPAD_SSL_CERTFILE and HPAD_SSL_KEYFILE go together (mutual TLS needs both)")
        return self


class ModelSettings(KafkaSettings):
    """The CLIP model a process loads (scorer and tuner must agree: prompt artifacts name their model)."""

    # model
    model: str = Field(DEFAULT_MODEL, description="open_clip architecture, e.g. ViT-B-16-plus-240, hpad-tiny")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (default laion400m_e32 / openai when no other source is set)")
    checkpoint: Path | None = Field(None, description="local open_clip checkpoint (.safetensors/.pt)")
    random_init: bool = Field(False, description="random weights (tests, benchmarks, demo): scores carry no meaning")
    cache_dir: Path | None = Field(None, description="cache dir of pretrained weights")
    allow_download: bool = Field(False, description="let a pretrained tag download weights")
    seed: int = Field(0, description="seed of random-init weights")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N")
    precision: Precision = Field("fp32", description="fp32, bf16 (about 2x on CPUs with avx512_bf16) or fp16 (GPU)")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0 = torch default)")
    laa: bool = Field(True, description="Locality-Aware Attention on")
    laa_layers: int = Field(4, ge=0, description="LAA in the last N blocks")
    laa_radius: int = Field(1, ge=0, description="LAA window radius (1 = 3x3)")
    laa_dual_path: bool = Field(True, description="vanilla path for the class token, LAA path for the patches")
    laa_kernel: Literal["vv", "qk"] = Field("vv", description="LAA path attention: vv (CLIP Surgery) or qk")
    laa_patch_mlp: bool = Field(False, description="run the block MLP on the LAA path (CLIP Surgery skips it)")
    memory_blocks: str = Field("auto", description="few-shot memory features: auto (blocks 3,8 of 12, scaled), final, or e.g. 3,8")
    memory_path: Literal["laa", "vanilla"] = Field("laa", description="path the memory reads LAA blocks from")
    fusion: Literal["harmonic", "normalized", "linear"] = Field("harmonic", description="text + memory fusion")
    logit_scale: float | None = Field(None, gt=0, description="softmax logit scale of text scores (unset: the model's, max 100)")
    sigma: float = Field(4.0, ge=0, description="anomaly-map smoothing, pixels at model resolution")
    # ROI and tiled scoring (hpad.tiling): the scorer's frames (which may override them with the `roi` and
    # `tiling` headers) and the tuner's training data are cut alike
    tiling: str = Field(
        "auto", description="tiling of frames without a `tiling` header: auto (frames over HPAD_TILE_MIN_PIXELS "
        "scored as tiles at the model's input size), off (whole frame), or COLSxROWS[@OVERLAP]")
    tile_overlap: float = Field(0.25, ge=0, le=0.9, description="fraction of a tile shared with its neighbour "
                                "(when the tiling gives no @OVERLAP)")
    tile_min_pixels: int = Field(
        2_000_000, ge=0, description="auto tiling scores a frame (or its ROI) whole up to this many pixels")
    max_tiles: int = Field(64, ge=1, le=1024, description="most tiles a frame is cut into: auto tiling grows "
                           "the tiles to fit, a larger COLSxROWS header is dead-lettered (bad_tiling)")

    @field_validator("tiling")
    @classmethod
    def _check_tiling(cls, value: str) -> str:
        try:
            parse_tiling(value)
        except FrameError as exc:
            raise ValueError(str(exc)) from None
        return value.strip().lower()

    @property
    def tiling_policy(self) -> TilingPolicy:
        """The tiling defaults as the library takes them (the worker's frames, the tuner's training data)."""
        return TilingPolicy(parse_tiling(self.tiling), self.tile_overlap, self.tile_min_pixels, self.max_tiles)

    @model_validator(mode="after")
    def _check_model(self) -> ModelSettings:
        sources = [self.pretrained is not None, self.checkpoint is not None, self.random_init]
        if sum(sources) > 1:
            raise ValueError("choose one weights source: HPAD_PRETRAINED, HPAD_CHECKPOINT or HPAD_RANDOM_INIT")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 is for GPUs; on CPU use HPAD_PRECISION=bf16 or fp32")
        if parse_tiling(self.tiling).tiles > self.max_tiles:
            raise ValueError(f"HPAD_TILING {self.tiling} has more tiles than HPAD_MAX_TILES={self.max_tiles}")
        return self

    @property
    def weights_pretrained(self) -> str | None:
        """The pretrained tag to load: explicit, or the model's default when no other source is set."""
        if self.pretrained is not None or self.checkpoint is not None or self.random_init:
            return self.pretrained
        return default_pretrained_tag(self.model)

    @property
    def random_weights(self) -> bool:
        return self.random_init


class WorkerSettings(ModelSettings):
    """Everything ``hpad serve`` can be told: topics, group timings, model, batching, limits, metrics."""

    client_id: str = Field("hpad-scorer", description="Kafka client id (shown in broker logs and quotas)")
    # topics and group
    input_topic: str = Field("hpad.frames", description="topic the camera frames arrive on")
    events_topic: str = Field("hpad.events", description="topic the scored events go to (one per frame)")
    dlq_topic: str = Field("hpad.frames.dlq", description="dead-letter topic for frames that cannot be scored")
    group_id: str = Field("hpad-scorer", description="consumer group; workers in one group share the partitions")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a new group starts reading: earliest or latest")
    session_timeout_ms: int = Field(
        10000, ge=1000, description="group session timeout: a dead worker's partitions move after about this long")
    heartbeat_interval_ms: int = Field(3000, ge=100, description="group heartbeat interval (< session timeout / 3)")
    max_poll_interval_ms: int = Field(
        300000, ge=5000, description="max time between polls before the broker evicts the worker")
    max_partition_fetch_bytes: int = Field(8 * MiB, ge=64 * 1024, description="max bytes fetched per partition")
    fetch_max_wait_ms: int = Field(
        100, ge=1, le=10000, description="longest the broker holds an empty fetch (kafka-python with 500 added "
        "about 120 ms median latency on a 10 frames/s stream; 100 adds about 4 ms)")
    exactly_once: bool = Field(
        False, description="transactional producer + offsets in the transaction (readers use read_committed)")
    transactional_id: str | None = Field(
        None, description="transactional id for exactly_once (default: client id + random suffix per process)")
    producer_max_request_size: int = Field(
        32 * MiB, ge=64 * 1024, description="largest event or dead letter the producer sends, bytes")
    producer_linger_ms: int = Field(5, ge=0, description="producer linger (the worker flushes every batch anyway)")
    producer_compression: Compression = Field("none", description="event compression: none or gzip")
    # prompts
    categories: Annotated[list[str], NoDecode] = Field(
        ["object"], description="categories served, comma-separated (the `category` header picks one)")
    default_category: str | None = Field(None, description="category for frames without a `category` header")
    prompt_dir: Path | None = Field(
        None, description="folder of prompt artifacts <category>.safetensors (default: zero-shot prompts)")
    prompts_topic: str | None = Field(
        "hpad.prompts", description="compacted prompt registry topic to follow for hot-swaps (empty = off)")
    normals_topic: str | None = Field(
        "hpad.normals", description="topic confidently normal frames are sampled to for the tuner (empty = off)")
    normals_margin: float = Field(
        0.1, ge=0, le=1, description="a frame is sampled as normal only if score < threshold - this margin")
    normals_per_minute: float = Field(
        6.0, ge=0, description="most normal samples per category and minute from one worker (0 = off)")
    # batching and pipeline
    max_batch_size: int = Field(8, ge=1, le=1024, description="most model images scored in one batch: frames, or "
                                "the tiles of tiled frames (a frame is never split across batches)")
    max_wait_ms: int = Field(20, ge=0, description="longest a frame waits for its batch to fill while the model is busy")
    decode_threads: int = Field(2, ge=1, le=64, description="image decode threads (OpenCV releases the GIL)")
    pipeline_depth: int = Field(2, ge=1, le=16, description="batches decoded ahead of the model")
    decode_scale: DecodeScale = Field(
        "auto", description="auto: JPEG decoded at the smallest 1/2, 1/4 or 1/8 DCT scale still >= the model's "
        "input size (sizes in events stay the frame's own); full: always at full size")
    gpu_decode: bool = Field(
        False, description="with the scorer on CUDA, decode JPEG batches on the GPU (nvJPEG) instead of the CPU")
    workers: int = Field(1, ge=1, le=16, description="worker processes in this container, each its own "
                         "consumer-group member (several share one GPU)")
    # image-tower runtime (hpad.runtime)
    runtime: Runtime = Field(
        "torch", description="what runs the image tower: torch (eager), onnxruntime or openvino (CPU, an "
        "`hpad export` folder in HPAD_RUNTIME_MODEL)")
    runtime_model: Path | None = Field(
        None, description="folder made by `hpad export --format onnx|openvino` (its manifest must match the model, "
        "weights and LAA settings)")
    runtime_precision: RuntimePrecision = Field(
        "fp32", description="precision of an exported runtime: fp32, bf16 (openvino) or int8 (an export made with "
        "--int8); torch uses HPAD_PRECISION")
    runtime_threads: int = Field(0, ge=0, le=256, description="intra-op threads of an exported runtime (0 = its default)")
    # limits
    max_payload_bytes: int = Field(16 * MiB, ge=1024, description="frames larger than this go to the DLQ")
    max_pixels: int = Field(40_000_000, ge=1, description="frames with more pixels (from the image header) go to the DLQ")
    max_side: int = Field(16384, ge=8, description="frames wider or taller than this go to the DLQ")
    min_side: int = Field(8, ge=1, description="frames narrower or shorter than this go to the DLQ")
    mask_policy: MaskPolicy = Field("anomalous", description="masks in events: anomalous frames, always or never")
    # reliability
    retry_backoff_ms: int = Field(200, ge=1, description="first retry delay for transient errors (doubles)")
    retry_backoff_max_ms: int = Field(10000, ge=1, description="longest retry delay")
    oom_retries: int = Field(3, ge=0, description="retries of a single frame after out-of-memory before it is dead-lettered")
    revoke_timeout_ms: int = Field(
        20000, ge=100, description="on partition revoke, wait this long for in-flight batches (< max_poll_interval_ms)")
    shutdown_timeout_ms: int = Field(30000, ge=100, description="on SIGTERM, wait this long for in-flight batches")
    # metrics and health
    metrics_port: int = Field(9400, ge=-1, le=65535, description="/metrics, /healthz, /readyz port (0 = any free, -1 = off)")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    liveness_timeout_ms: int = Field(60000, ge=1000, description="/healthz fails when the main loop is stuck this long")
    lag_interval_ms: int = Field(2000, ge=100, description="how often consumer lag is computed")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    _split_categories = field_validator("categories", mode="before")(split_csv)


    @field_validator("prompts_topic", "normals_topic", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("categories")
    @classmethod
    def _check_categories(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one category is needed, e.g. HPAD_CATEGORIES=bottle,widget")
        if len(set(value)) != len(value):
            raise ValueError(f"categories are repeated: {value}")
        bad = [c for c in value if not c.replace("_", "").replace("-", "").replace(".", "").isalnum()]
        if bad:
            raise ValueError(f"category names may use letters, digits, '_', '-', '.': {bad}")
        return value

    @model_validator(mode="after")
    def _check_worker(self) -> WorkerSettings:
        if self.fetch_max_wait_ms >= self.request_timeout_ms:
            raise ValueError("HPAD_FETCH_MAX_WAIT_MS must be below HPAD_REQUEST_TIMEOUT_MS")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("HPAD_HEARTBEAT_INTERVAL_MS must be at most a third of HPAD_SESSION_TIMEOUT_MS")
        if self.revoke_timeout_ms >= self.max_poll_interval_ms:
            raise ValueError("HPAD_REVOKE_TIMEOUT_MS must be below HPAD_MAX_POLL_INTERVAL_MS")
        if self.liveness_timeout_ms <= max(self.revoke_timeout_ms, self.request_timeout_ms):
            raise ValueError("HPAD_LIVENESS_TIMEOUT_MS must exceed HPAD_REVOKE_TIMEOUT_MS and HPAD_REQUEST_TIMEOUT_MS "
                             "(the main loop may wait that long for a rebalance or a commit)")
        if self.default_category is not None and self.default_category not in self.categories:
            raise ValueError(f"HPAD_DEFAULT_CATEGORY {self.default_category!r} is not in HPAD_CATEGORIES")
        if self.producer_max_request_size < self.max_payload_bytes + 64 * 1024:
            raise ValueError("HPAD_PRODUCER_MAX_REQUEST_SIZE must exceed HPAD_MAX_PAYLOAD_BYTES by 64 KiB "
                             "(a dead letter carries the original frame)")
        if self.retry_backoff_max_ms < self.retry_backoff_ms:
            raise ValueError("HPAD_RETRY_BACKOFF_MAX_MS must be >= HPAD_RETRY_BACKOFF_MS")
        if self.min_side > self.max_side:
            raise ValueError("HPAD_MIN_SIDE must be <= HPAD_MAX_SIDE")
        if self.runtime != "torch":
            if self.runtime_model is None:
                raise ValueError(f"HPAD_RUNTIME={self.runtime} needs HPAD_RUNTIME_MODEL (a folder made by hpad export)")
            if self.device not in ("auto", "cpu") or self.gpu_decode:
                raise ValueError(f"HPAD_RUNTIME={self.runtime} runs on the CPU: set HPAD_DEVICE=cpu (or auto) and "
                                 "HPAD_GPU_DECODE=false")
            if self.precision != "fp32":
                raise ValueError(f"with HPAD_RUNTIME={self.runtime} set HPAD_PRECISION=fp32 (the torch text tower and "
                                 "the export check) and choose the image tower's with HPAD_RUNTIME_PRECISION")
            if self.runtime == "onnxruntime" and self.runtime_precision == "bf16":
                raise ValueError("HPAD_RUNTIME=onnxruntime has no bf16 on the CPU: HPAD_RUNTIME_PRECISION=fp32 or int8")
        elif self.runtime_precision == "int8":
            raise ValueError("HPAD_RUNTIME_PRECISION=int8 needs HPAD_RUNTIME=onnxruntime or openvino")
        topics = [t for t in (self.input_topic, self.events_topic, self.dlq_topic, self.prompts_topic,
                              self.normals_topic) if t]
        if len(set(topics)) != len(topics):
            raise ValueError("input, events, dead-letter, prompts and normals topics must all differ")
        return self


class CameraSettings(KafkaSettings):
    """``hpad camera``: where to publish, how streams are opened and reconnected, metrics (the sources, rates
    and ids are flags or the cameras file)."""

    client_id: str = Field("hpad-camera", description="Kafka client id")
    input_topic: str = Field("hpad.frames", description="topic the frames are published to")
    producer_max_request_size: int = Field(32 * MiB, ge=64 * 1024, description="largest frame the camera sends")
    open_timeout_ms: int = Field(10000, ge=100, description="longest a stream may take to open (OpenCV/FFmpeg "
                                 "CAP_PROP_OPEN_TIMEOUT_MSEC)")
    read_timeout_ms: int = Field(5000, ge=100, description="a read waiting longer counts as a stall "
                                 "(CAP_PROP_READ_TIMEOUT_MSEC; FFmpeg retries RTSP about 3 times before giving up)")
    reconnect_backoff_ms: int = Field(500, ge=1, description="first wait before reconnecting a dropped stream "
                                      "(doubles per failed attempt)")
    reconnect_backoff_max_ms: int = Field(30000, ge=1, description="longest wait between reconnect attempts")
    reconnect_jitter: float = Field(0.2, ge=0, le=1, description="each backoff is randomised by +/- this fraction")
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="RTSP transport (FFmpeg rtsp_transport; unused when OPENCV_FFMPEG_CAPTURE_OPTIONS is set)")
    max_pending_frames: int = Field(1000, ge=1, description="frames per camera handed to the producer and not "
                                    "yet acknowledged before capture waits")
    ack_timeout_ms: int = Field(30000, ge=100, description="on stop, wait this long for frames in flight to be "
                                "acknowledged (the rest count as failed)")
    metrics_port: int = Field(9402, ge=-1, le=65535, description="/metrics, /healthz, /readyz port (0 = any free, "
                              "-1 = off)")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    liveness_timeout_ms: int = Field(60000, ge=1000, description="/healthz fails when a capture thread is stuck "
                                     "this long")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @model_validator(mode="after")
    def _check_camera(self) -> CameraSettings:
        if self.reconnect_backoff_max_ms < self.reconnect_backoff_ms:
            raise ValueError("HPAD_RECONNECT_BACKOFF_MAX_MS must be >= HPAD_RECONNECT_BACKOFF_MS")
        longest = max(self.open_timeout_ms + 3 * self.read_timeout_ms,
                      self.reconnect_backoff_max_ms * (1 + self.reconnect_jitter))
        if self.liveness_timeout_ms <= longest:
            raise ValueError(f"HPAD_LIVENESS_TIMEOUT_MS must exceed {longest:.0f} ms (open timeout + 3 read "
                             "timeouts, and the longest backoff): a capture thread may wait that long")
        return self


# ------------------------------------------------------------------------------------------ loading


def load_settings(cls: type[KafkaSettings], overrides: dict[str, Any] | None = None) -> KafkaSettings:
    """Build ``cls`` from env + .env + ``overrides`` (CLI flags win); pydantic errors -> one ConfigError."""
    try:
        return cls(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            env = f"{ENV_PREFIX}{where.upper()}" if where else "settings"
            problems.append(f"{env}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


# ------------------------------------------------------------------------------------------ kafka kwargs


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def connection_kwargs(s: KafkaSettings) -> dict[str, Any]:
    """Address + security options, identical for consumers, producers and admin clients."""
    return {
        "bootstrap_servers": [part.strip() for part in s.bootstrap_servers.split(",") if part.strip()],
        "client_id": s.client_id,
        "security_protocol": s.security_protocol,
        "ssl_cafile": _path(s.ssl_cafile),
        "ssl_certfile": _path(s.ssl_certfile),
        "ssl_keyfile": _path(s.ssl_keyfile),
        "ssl_password": _secret(s.ssl_password),
        "ssl_check_hostname": s.ssl_check_hostname,
        "sasl_mechanism": s.sasl_mechanism,
        "sasl_plain_username": _secret(s.sasl_plain_username),
        "sasl_plain_password": _secret(s.sasl_plain_password),
        "request_timeout_ms": s.request_timeout_ms,
        "bootstrap_timeout_ms": s.request_timeout_ms,  # a client that cannot connect fails within it
    }


def group_consumer_kwargs(s: Any, max_poll_records: int) -> dict[str, Any]:
    """KafkaConsumer options of a group member that commits by hand: the connection, group timings, and
    read_committed under exactly_once. ``s``: a settings class with the group fields (`KafkaSettings` plus
    group_id, auto_offset_reset, session/heartbeat/max-poll timings, exactly_once)."""
    return {
        **connection_kwargs(s),
        "group_id": s.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": s.auto_offset_reset,
        "session_timeout_ms": s.session_timeout_ms,
        "heartbeat_interval_ms": s.heartbeat_interval_ms,
        "max_poll_interval_ms": s.max_poll_interval_ms,
        "max_poll_records": max_poll_records,
        "isolation_level": "read_committed" if s.exactly_once else "read_uncommitted",
    }


def consumer_kwargs(s: WorkerSettings) -> dict[str, Any]:
    """KafkaConsumer options of the worker: manual commits, group timings, read_committed under exactly_once."""
    return {
        **group_consumer_kwargs(s, s.max_batch_size),
        "max_partition_fetch_bytes": s.max_partition_fetch_bytes,
        "fetch_max_wait_ms": s.fetch_max_wait_ms,
        "fetch_max_bytes": max(52428800, s.max_partition_fetch_bytes),
    }


def prompts_consumer_kwargs(s: KafkaSettings) -> dict[str, Any]:
    """A group-less consumer that reads the prompt registry topic from the beginning (artifacts <= 64 MiB)."""
    return {
        **connection_kwargs(s),
        "client_id": f"{s.client_id}-prompts",
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 80 * MiB,
        "fetch_max_bytes": 80 * MiB,
    }


def producer_kwargs(s: KafkaSettings, transactional_id: str | None = None) -> dict[str, Any]:
    """KafkaProducer options: idempotent, acks=all; transactional when ``transactional_id`` is given."""
    max_request = getattr(s, "producer_max_request_size", 32 * MiB)
    kwargs: dict[str, Any] = {
        **connection_kwargs(s),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": getattr(s, "producer_linger_ms", 5),
        "max_request_size": max_request,
        "batch_size": 256 * 1024,
        "compression_type": None if getattr(s, "producer_compression", "none") == "none" else s.producer_compression,
    }
    if transactional_id is not None:
        kwargs["transactional_id"] = transactional_id
    return kwargs


# ------------------------------------------------------------------------------------------ CLI flags


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``Annotated[list[str], ...]`` -> list; Literal stays Literal."""
    if get_origin(annotation) is Annotated:
        return _base_type(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else annotation
    return annotation


def cli_fields(cls: type[KafkaSettings]) -> list[str]:
    """Fields that get a command-line flag: every field except secrets (those come from env / .env only)."""
    return [name for name, info in cls.model_fields.items() if _base_type(info.annotation) is not SecretStr]


def add_cli_flags(parser: argparse.ArgumentParser, cls: type[KafkaSettings]) -> None:
    """One ``--field-name`` flag per setting (booleans get ``--x/--no-x``); unset flags leave env values alone."""
    group = parser.add_argument_group("settings (each also HPAD_<NAME> in the environment or .env; flags win)")
    for name in cli_fields(cls):
        info = cls.model_fields[name]
        kind = _base_type(info.annotation)
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} (env {ENV_PREFIX}{name.upper()}, default {_default_text(info.default)})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(kind) is Literal:
            group.add_argument(flag, dest=name, choices=[str(c) for c in get_args(kind)], default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, help=help_text)


def parse_service_args(prog: str, description: str, cls: type[KafkaSettings], argv: Sequence[str],
                       extra: Sequence[tuple[str, type, str]] = ()) -> tuple[Any, argparse.Namespace]:
    """argparse for a service command: ``extra`` (flag, type, help) options + one flag per setting of ``cls``;
    returns the validated settings (env < .env < flags) and the namespace."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for flag, kind, help_text in extra:
        parser.add_argument(flag, type=kind, help=help_text)
    add_cli_flags(parser, cls)
    ns = parser.parse_args(list(argv))
    return load_settings(cls, cli_overrides(ns, cls)), ns


def cli_overrides(ns: argparse.Namespace, cls: type[KafkaSettings]) -> dict[str, Any]:
    """The settings given on the command line (pydantic converts the strings)."""
    return {name: getattr(ns, name) for name in cli_fields(cls) if getattr(ns, name, None) is not None}


# ------------------------------------------------------------------------------------------ docs


def _default_text(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_table(cls: type[KafkaSettings] = WorkerSettings, fields: Sequence[str] | None = None) -> str:
    """Markdown table of every setting: environment variable, default, meaning (README.md embeds it)."""
    lines = ["| environment variable | default | meaning |", "|---|---|---|"]
    for name, info in cls.model_fields.items():
        if fields is not None and name not in fields:
            continue
        secret = " (secret: never logged)" if _base_type(info.annotation) is SecretStr else ""
        default = _default_text(info.default)
        description = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | `{default}` | {description}{secret} |")
    return "\n".join(lines)
