"""Where the pipeline's records go: console, file, Kafka (with its spool), WebSocket."""
