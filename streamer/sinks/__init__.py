"""The pipeline's sinks: each consumes one fan-out channel (streamer.fanout.Channel).

- `file.FileSink`: JSON lines with size-based rotation.
- `kafka.KafkaSink`: Apache Kafka (aiokafka), with `spool.Spool` on disk while the broker is
  unreachable.
- `websocket.WebSocketHub`: the live feed at /api/v1/flows, one bounded queue per client.
- `console.ConsoleSink`: one line per event on stdout (`--print-events`).
"""
