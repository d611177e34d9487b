"""A flow event's journey: ring buffer (source) -> decode -> enrich -> fanout -> sinks,
assembled by the pipeline; text renders records for people."""
