"""``hpad console``: the operators' web page beside the line.

Reads the frames topic and the events topic (no consumer group: every console sees everything), joins them
by ``frame_id`` in bounded memory (`store.FrameStore`: per-camera rings of frames, the recent anomalies,
a score timeline, the prompt versions seen), renders the anomaly mask over the frame server-side
(`render`), and serves a small static page that follows the line by server-sent events (`app`).
On an anomaly an operator with the feedback token can say "false alarm" or "real defect"; the console
then publishes one feedback record (`feedback`, ``consumers/schemas/feedback.schema.json``) to
``hpad.feedback``, carrying the frame itself so the tuner needs nothing else.
"""
