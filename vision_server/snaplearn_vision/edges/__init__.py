"""gRPC edges over the core: VisionService (Classify, ClassifyStream) and the Open Inference
Protocol, all through one wrapper for deadline, status and request metrics (edges.call)."""
