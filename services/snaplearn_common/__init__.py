"""What both servers share: the event bus, server bootstrap, errors, metrics, settings.

From the bottom up: records, errors and topics (plain data); events (the payloads on the
bus), settings (one declaration per process: flags and environment variables), files
(atomic writes, ready files), metrics and grpc_errors; then eventbus (interface, embedded
and Kafka backends, the publisher and its spool) and server (gRPC bootstrap); the launcher
on top. The layers are checked by import-linter (.importlinter, common-* contracts).
"""
