"""The recommender server: learns from the event stream, serves Recommend over gRPC.

Two apps built from the same parts: `trainer.TrainerApp` (consumes the bus, trains, checkpoints,
publishes snapshots, serves) and `query.QueryApp` (serves the snapshots a trainer published).
Layers, top to bottom (import-linter keeps them; see .importlinter): main; trainer | query;
frontend (gRPC server, /metrics, RecordFeedback's channel); servicer | config; worker |
replication | feedback; service | checkpoint | snapshot_store; model; snapshot; catalog |
features | metrics. Offline evaluation lives apart, in snaplearn_offline.
"""
