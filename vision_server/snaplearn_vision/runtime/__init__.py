"""Runtime: what runs a model. Architectures, the on-disk model repository, the loaded
classifier (engine), photo decoding and the decode threads. Above the schema; knows nothing of
the service that batches requests, nor of gRPC."""
