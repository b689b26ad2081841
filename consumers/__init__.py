"""hpad's streaming service: the Kafka scoring worker (``hpad serve``) and its tools.

Kafka, HTTP and environment reading live here; all scoring math stays in `hpad` (the worker calls
`hpad.scorer.Scorer`). Modules:

* `settings` - the one settings class per process (env / .env / flags) and the Kafka client options
* `contract`, `decode`, `events` - the message contract: frame headers, header-only size checks and
  decoding, events and dead letters (schemas in ``schemas/``, prose in ``README.md``)
* `worker`, `pipeline`, `delivery`, `offsets` - the consumer-group loop, the decode/score/output stages,
  checked delivery, and which offsets may be committed
* `prompt_provider` - prompt sets per category behind a swappable interface
* `metrics` - Prometheus metrics, /metrics /healthz /readyz
* `app` (``hpad serve``), `supervisor` (``hpad serve --workers N``: N workers sharing one GPU),
  `camera` (``hpad camera``), `broker` (embedded tansu), `demo` (``make demo``),
  `docs` (generated tables of README.md)
"""
