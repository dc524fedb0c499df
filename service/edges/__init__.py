"""The service's edges: HTTP (REST and the Open Inference Protocol), the Open Inference Protocol over gRPC
(grpc_edge.py) and BentoML's API functions. Each parses a request, calls the engine (service/engine/) and encodes
its answer; none decides anything about the work."""
