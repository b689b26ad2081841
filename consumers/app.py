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

from kafka.errors import KafkaError

from consumers import kafka_io
from consumers.metrics import Health, WorkerMetrics
from consumers.models import build_scorer, model_info, runtime_spec
from consumers.prompt_provider import KafkaPromptProvider, PromptProvider, StaticPromptProvider
from consumers.service import Telemetry, run_main
from consumers.settings import WorkerSettings, parse_service_args, prompts_consumer_kwargs
from consumers.worker import Worker
from hpad.errors import ConfigError
from hpad.scorer import Scorer

log = logging.getLogger("hpad.serve")


def build_worker(settings: WorkerSettings, metrics: WorkerMetrics | None = None,
                 health: Health | None = None) -> Worker:
    scorer = build_scorer(settings, settings.max_batch_size, runtime_spec(settings))
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


def serve(settings: WorkerSettings, ns: argparse.Namespace, telemetry: Telemetry) -> int:
    """One worker until it stops; its exit code."""
    worker = build_worker(settings, telemetry.metrics, telemetry.health)
    if worker.model.random_weights:
        log.warning("RANDOM WEIGHTS: model %s is not pretrained; scores carry no meaning", worker.model.model)
    result = worker.run(max_frames=ns.max_frames, timeout=ns.timeout)
    log.info("stopped (%s): %d frames done, drained=%s", result.reason, result.completed, result.drained)
    if result.error:
        log.error("%s", result.error)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def start(settings: WorkerSettings, ns: argparse.Namespace, telemetry: Telemetry | None) -> int:
        if settings.workers > 1:  # a supervisor of that many single-worker children (consumers.supervisor)
            from consumers.supervisor import supervise

            return supervise(settings, args)
        assert telemetry is not None
        return serve(settings, ns, telemetry)

    return run_main(args, parse_args, start, packages=("hpad", "consumers"),
                    metrics=lambda settings: WorkerMetrics() if settings.workers == 1 else None,
                    fatal=(KafkaError,), describe=lambda exc: f"Kafka error: {exc}", logger=log)
