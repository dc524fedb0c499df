"""The service's edges: HTTP (REST and the Open Inference Protocol) and BentoML's API functions. Each parses a
request, calls the engine (service/engine/) and encodes its answer; none decides anything about the work."""
