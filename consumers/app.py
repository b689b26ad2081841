"""``hpad serve``: the Kafka scoring worker process.

Reads `WorkerSettings` (env / .env / flags), starts the metrics server, loads the model and the prompt
sets, then runs the `consumers.worker.Worker` until SIGTERM/SIGINT (or ``--max-frames`` / ``--timeout``).
Exit codes: 0 clean stop, 1 fatal output error (nothing after it committed), 2 bad settings.
With HPAD_WORKERS / ``--workers`` N > 1 the process supervises N such workers instead
(`consumers.supervisor`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch
from kafka.errors import KafkaError

from consumers import kafka_io
from consumers.events import ModelInfo
from consumers.metrics import Health, WorkerMetrics, start_metrics_server
from consumers.prompt_provider import KafkaPromptProvider, PromptProvider, StaticPromptProvider
from consumers.settings import (
    ModelSettings,
    WorkerSettings,
    parse_service_args,
    prompts_consumer_kwargs,
)
from consumers.worker import Worker
from hpad.backbone import load_backbone
from hpad.config import scorer_config, weights_spec
from hpad.errors import ConfigError
from hpad.scorer import Scorer

log = logging.getLogger("hpad.serve")


def build_scorer(settings: ModelSettings, max_batch: int = 8) -> Scorer:
    """The model named by the settings, wrapped in a Scorer with the settings' LAA, sigma and batch size."""
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    spec = weights_spec(
        model=settings.model, pretrained=settings.pretrained, checkpoint=settings.checkpoint,
        random_init=settings.random_init, cache_dir=settings.cache_dir, allow_download=settings.allow_download,
        seed=settings.seed,
    )
    backbone = load_backbone(spec, device=settings.device, precision=settings.precision)
    return Scorer(backbone, config=scorer_config(laa=settings.laa, laa_layers=settings.laa_layers,
                                                 laa_radius=settings.laa_radius, sigma=settings.sigma,
                                                 max_batch=max_batch))


def model_info(scorer: Scorer, precision: str) -> ModelInfo:
    b = scorer.backbone
    return ModelInfo(model=b.model_name, weights=b.weights_id, identity=b.identity, random_weights=b.random_weights,
                     device=str(b.device), precision=precision)


def build_worker(settings: WorkerSettings, metrics: WorkerMetrics | None = None,
                 health: Health | None = None) -> Worker:
    scorer = build_scorer(settings, settings.max_batch_size)
    if settings.gpu_decode and scorer.backbone.device.type != "cuda":
        raise ConfigError(f"HPAD_GPU_DECODE=true decodes JPEGs with nvJPEG on the scorer's GPU, but the scorer "
                          f"runs on {scorer.backbone.device}; set HPAD_DEVICE=cuda or HPAD_GPU_DECODE=false")
    metrics = metrics or WorkerMetrics()
    return Worker(settings, scorer, build_provider(settings, scorer, metrics), model_info(scorer, settings.precision),
                  metrics, health)


def build_provider(settings: WorkerSettings, scorer: Scorer, metrics: WorkerMetrics) -> PromptProvider:
    """Start sets (zero-shot or HPAD_PROMPT_DIR), following HPAD_PROMPTS_TOPIC unless it is off."""
    static = StaticPromptProvider.build(scorer, settings.categories, settings.prompt_dir)
    if settings.prompts_topic is None:
        return static
    return KafkaPromptProvider(scorer, static.snapshot(), settings.prompts_topic,
                               lambda: kafka_io.make_consumer(prompts_consumer_kwargs(settings)), metrics)


def parse_args(argv: Sequence[str]) -> tuple[WorkerSettings, argparse.Namespace]:
    return parse_service_args("hpad serve", __doc__.split("\n\n")[0], WorkerSettings, argv, [
        ("--max-frames", int, "stop after this many frames are done (tests, demos)"),
        ("--timeout", float, "stop after this many seconds")])


def main(argv: Sequence[str] | None = None) -> int:
    settings, ns = parse_args(sys.argv[1:] if argv is None else argv)
    for package in ("hpad", "consumers"):  # the root logger stays as the CLI set it (open_clip is chatty)
        logging.getLogger(package).setLevel(settings.log_level)
    if settings.workers > 1:  # a supervisor of that many single-worker children (consumers.supervisor)
        from consumers.supervisor import supervise

        return supervise(settings, sys.argv[1:] if argv is None else argv)
    metrics = WorkerMetrics()
    health = Health(settings.liveness_timeout_ms / 1000)
    server = start_metrics_server(metrics, health, settings.metrics_host, settings.metrics_port)
    try:
        worker = build_worker(settings, metrics, health)
        if worker.model.random_weights:
            log.warning("RANDOM WEIGHTS: model %s is not pretrained; scores carry no meaning", worker.model.model)
        result = worker.run(max_frames=ns.max_frames, timeout=ns.timeout)
    except KafkaError as exc:
        log.error("Kafka error: %s", exc)
        return 1
    finally:
        if server is not None:
            server.stop()
    log.info("stopped (%s): %d frames done, drained=%s", result.reason, result.completed, result.drained)
    if result.error:
        log.error("%s", result.error)
    return result.exit_code
