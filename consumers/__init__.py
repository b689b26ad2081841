"""hpad's streaming service: the Kafka scoring worker (``hpad serve``) and its tools.

Kafka, HTTP and environment reading live here; all scoring math stays in `hpad` (the worker calls
`hpad.scorer.Scorer` through `hpad.tiled_scoring.score_frames`, which applies each frame's ROI and tile plan).
Dependencies point one way, tuner -> consumers -> hpad (tests/test_architecture.py).

The service kernel: what every service process shares (``hpad serve``, ``hpad camera``, ``hpad tune``,
``hpad prompts``), importing no other module of this package; the tuner imports only these:

* `settings` - the settings bases (`KafkaSettings`, `ModelSettings`), one frozen class per process, the
  Kafka client options and the CLI flags built from the fields
* `kafka_io` - clients, checked sends, retries with backoff
* `contract`, `decode`, `events` - the message contract: frame headers, header-only size checks and
  decoding, events and dead letters (schemas in ``schemas/``, prose in ``README.md``)
* `metrics` - Prometheus helpers, the worker's metrics, /metrics /healthz /readyz
* `models` - the model factory (settings -> `Scorer`, `ModelInfo`)
* `prompt_records` - the prompt-record format of the registry topic
* `service` - process lifecycle: the one `run_main` runner, `Stoppable`, `stop_signals`

The scoring worker (``hpad serve``):

* `worker` - the consumer-group loop: poll -> admit -> form a batch -> dispatch -> commit
* `batching` (when to dispatch), `checkpoint` (the `OffsetBook` and commits), `rebalance` (revoke, lose,
  assign), `offsets` (which offsets may be committed)
* `pipeline` (decode/score stages and their threads), `items` (what flows through them), `output` (events and
  dead letters of a batch), `delivery` (checked delivery)
* `prompt_provider` - prompt sets per category behind a swappable interface; `normals` - samples for the tuner
* `app` (``hpad serve``), `supervisor` (``hpad serve --workers N``: N workers sharing one GPU)

Alerting (``hpad alerts``): the package ``consumers/alerts/`` (debounce rule, payloads, sinks, settings,
metrics, the consumer loop); it uses only the kernel (and `docs` for its README tables).

Tools: `camera` (``hpad camera``; with `sources`, `capture`, `cameras_file`, `camera_metrics`), `broker` (embedded tansu), `apache_kafka` (Apache Kafka KRaft launcher for tests
and development), `demo` (``make demo``), `docs` (generated
tables of README.md).

The operator console (``hpad console``): `console/` - `store` (frames and events joined by frame id in
bounded memory), `render` (mask overlays), `feedback` (the ``hpad.feedback`` record), `app` (reader thread,
Starlette app, process), `static/` (the page).
"""
