"""``hpad alerts``: debounced anomaly alerts from the events topic to Alertmanager and a signed JSON webhook.

One anomalous frame is not an incident. Per line (camera, category) a rule "k anomalous frames among the
last n" opens an *episode*; m consecutive normal frames close it; a cooldown keeps a line quiet for a while
after it closed. Every episode is a firing and a resolved notification to each sink.

* `rules` - the pure debounce state machine (events in, fired / resolved transitions out) and the event
  fields it reads; no Kafka, no HTTP, no clock (event time only, so a replay rebuilds the same state)
* `notify` - pure payloads: the Alertmanager v2 alert, the webhook body, its HMAC-SHA256 signature and
  idempotency key
* `sinks` - HTTP delivery with capped-backoff retries (Alertmanager, webhook) and the dead-letter topic
* `settings`, `metrics`, `docs` - the process's settings class, Prometheus metrics, README tables
* `app` - the consumer loop (poll -> debounce -> deliver -> commit) and ``main``
"""
