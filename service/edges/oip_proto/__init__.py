"""The Open Inference Protocol's gRPC messages and service, generated from Triton's published protocol files
(grpc_service.proto, model_config.proto: github.com/triton-inference-server/common, protobuf/, unchanged) by
generate.sh, which says how to regenerate them. Generated and committed, so that the serving image needs only
grpcio and protobuf at run time (service/edges/grpc_edge.py says why not tritonclient's copies).
"""
