"""Settings of the tuner daemon (``hpad tune``) and of ``hpad prompts``: the only place they read the environment.

Same rules as the scorer's settings (`consumers.settings`): ``HPAD_*`` environment variables, a ``.env``
file, command-line flags win, secrets never shown, everything validated at start. The model settings are
shared with the scorer (`ModelSettings`): the tuner must run the very model the scorers run, because every
prompt artifact names its model and scorers refuse artifacts of another one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from consumers.settings import KafkaSettings, MiB, ModelSettings, split_csv
from hpad.mpts import TrainConfig
from tuner.job import TuneConfig


class RegistrySettings(KafkaSettings):
    """``hpad prompts``: where the registry lives and which model its artifacts must match."""

    client_id: str = Field("hpad-prompts", description="Kafka client id")
    prompts_topic: str = Field("hpad.prompts", description="compacted topic holding the prompt versions")
    expected_identity: str | None = Field(
        None, description="refuse to publish artifacts of another model identity (e.g. ViT-B-16-plus-240/laion400m_e32)")


class TunerSettings(ModelSettings):
    """Everything ``hpad tune`` can be told: topics, reservoir, schedule, training and gate."""

    client_id: str = Field("hpad-tuner", description="Kafka client id")
    normals_topic: str = Field("hpad.normals", description="topic of fresh normal frames (scorers' samples, verified=true from operators)")
    prompts_topic: str = Field("hpad.prompts", description="compacted prompt registry topic the tuner publishes to")
    group_id: str = Field("hpad-tuner", description="consumer group of the tuner on the normals topic")
    categories: Annotated[list[str], NoDecode] = Field(
        ["object"], description="categories to tune, comma-separated (frames of others are dropped)")
    session_timeout_ms: int = Field(10000, ge=1000, description="group session timeout")
    heartbeat_interval_ms: int = Field(3000, ge=100, description="group heartbeat interval")
    # reservoir
    reservoir_dir: Path = Field(Path("hpad-reservoir"), description="persistent folder of the normal-frame reservoir and tuner state")
    reservoir_recent: int = Field(64, ge=1, description="recent (scorer-sampled) normals kept per category")
    reservoir_verified: int = Field(64, ge=0, description="operator-verified normals kept per category")
    max_payload_bytes: int = Field(16 * MiB, ge=1024, description="normals larger than this are dropped")
    max_pixels: int = Field(40_000_000, ge=1, description="normals with more pixels are dropped")
    labelled_dir: Path | None = Field(
        None, description="optional labelled anomalies for the gate: <dir>/<category>/<name>.png + <name>_mask.png")
    # operator feedback (hpad console): see tuner/feedback.py
    feedback_topic: str | None = Field(
        "hpad.feedback", description="topic of operator feedback records from hpad console (empty = off)")
    feedback_kept: int = Field(64, ge=1, description="feedback frames kept per category and verdict (oldest deleted first)")
    feedback_max_share: float = Field(
        0.25, ge=0, le=1, description="cap: false alarms admitted per camera and operator, as a share of the run's "
        "other normals (floor; 0 = ignore false alarms)")
    feedback_max_defects: int = Field(
        8, ge=0, description="cap: confirmed real defects admitted per camera and operator in one run")
    feedback_max_threshold_drop: float = Field(
        0.05, ge=0, le=1, description="confirmed defects may lower a candidate's threshold by at most this (never raise it)")
    # schedule
    interval_s: float = Field(3600.0, ge=0, description="re-tune each category this often (0 = only on new samples)")
    new_samples: int = Field(32, ge=0, description="re-tune a category after this many new normals (0 = only on the interval)")
    min_gap_s: float = Field(60.0, ge=0, description="at least this long between two runs of one category")
    retry_s: float = Field(300.0, ge=0, description="after a failed run, wait this long before trying the category again")
    # tuning (OAGM + MPTS) and gate
    shots: int = Field(4, ge=1, le=64, description="k: newest normals used as the shots")
    min_normals: int = Field(12, ge=3, description="do not tune a category with fewer normals in the reservoir")
    gate_normals: int = Field(16, ge=1, description="held-out normals in the validation gate")
    gate_anomalies: int = Field(32, ge=1, description="synthetic (OAGM) anomalies in the validation gate")
    margin: float = Field(0.02, ge=0, lt=1, description="publish only if the candidate is not worse than the current version by more than this")
    epochs: int = Field(20, ge=1, description="MPTS epochs per run")
    steps_per_epoch: int = Field(8, ge=1, description="MPTS steps per epoch")
    batch_size: int = Field(32, ge=2, description="MPTS batch size")
    lr: float = Field(2e-3, gt=0, description="MPTS learning rate")
    patience: int = Field(8, ge=1, description="MPTS early stop: epochs without validation improvement")
    n_ctx: int = Field(8, ge=1, le=32, description="learnable context tokens per class")
    mpts: bool = Field(True, description="meta-guided gradient projection on (off = plain gradient, ablation)")
    lam: float = Field(1.0, ge=0, le=1, description="MPTS weight lambda")
    oagm_on_object: bool = Field(True, description="synthesize anomalies on the object only (off = anywhere, ablation)")
    train_seed: int = Field(0, description="base seed of the tuning runs (run number is added)")
    # metrics and health
    metrics_port: int = Field(9401, ge=-1, le=65535, description="/metrics, /healthz, /readyz port (0 = any free, -1 = off)")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    liveness_timeout_ms: int = Field(
        7_200_000, ge=1000, description="/healthz fails when the main loop is stuck this long (runs happen off the loop)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    _split_categories = field_validator("categories", mode="before")(split_csv)

    @field_validator("feedback_topic", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_tuner(self) -> TunerSettings:
        if self.feedback_topic in (self.normals_topic, self.prompts_topic):
            raise ValueError("HPAD_FEEDBACK_TOPIC must differ from HPAD_NORMALS_TOPIC and HPAD_PROMPTS_TOPIC")
        if not self.categories:
            raise ValueError("at least one category is needed, e.g. HPAD_CATEGORIES=bottle")
        if self.normals_topic == self.prompts_topic:
            raise ValueError("HPAD_NORMALS_TOPIC and HPAD_PROMPTS_TOPIC must differ")
        if self.interval_s == 0 and self.new_samples == 0:
            raise ValueError("set HPAD_INTERVAL_S or HPAD_NEW_SAMPLES (both 0 would never tune)")
        if self.min_normals < self.shots + 2:
            raise ValueError(f"HPAD_MIN_NORMALS must be at least HPAD_SHOTS + 2 = {self.shots + 2}")
        if self.reservoir_recent + self.reservoir_verified < self.min_normals:
            raise ValueError("the reservoir (HPAD_RESERVOIR_RECENT + HPAD_RESERVOIR_VERIFIED) cannot hold HPAD_MIN_NORMALS")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("HPAD_HEARTBEAT_INTERVAL_MS must be at most a third of HPAD_SESSION_TIMEOUT_MS")
        return self

    def tune_config(self) -> TuneConfig:
        from hpad.oagm import OAGMConfig

        train = TrainConfig(epochs=self.epochs, steps_per_epoch=self.steps_per_epoch, batch_size=self.batch_size,
                            lr=self.lr, patience=self.patience, n_ctx=self.n_ctx, mpts=self.mpts, lam=self.lam,
                            oagm=OAGMConfig(on_object=self.oagm_on_object))
        return TuneConfig(shots=self.shots, min_normals=self.min_normals, gate_normals=self.gate_normals,
                          gate_anomalies=self.gate_anomalies, margin=self.margin, train=train,
                          max_threshold_drop=self.feedback_max_threshold_drop,
                          tiling=self.tiling_policy)
