"""Core: classification as a service. Admission, dynamic batching, the request ids and metrics,
the events it publishes. Takes plain arguments; knows nothing of gRPC or of the settings."""
