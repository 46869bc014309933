"""SnapLearn's vision server, in layers (each imports only those below it; .importlinter checks):

main, train                   the commands: serve (one process or a supervisor), train a model
process | server | worksheets supervisor of worker processes; VisionServer; the photo renderer
config                        VisionSettings: flags and SNAPLEARN_VISION_* variables
edges                         gRPC: VisionService (Classify, ClassifyStream), Open Inference Protocol
core                          ClassificationService, DynamicBatcher, metrics (no gRPC)
runtime                       architectures, model repository, engine, decoding, decode threads
schema                        model config, batching limits, names: no torch, numpy or Pillow
"""
