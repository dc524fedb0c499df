#!/bin/sh
# Regenerates the Python modules beside this script from the two .proto files (Triton's published protocol,
# github.com/triton-inference-server/common, protobuf/, unchanged). grpcio-tools 1.75.1 bundles protoc 31.1,
# whose code runs on protobuf >= 6.31.1 (7.x too) and grpcio >= 1.75.1: the floors pyproject.toml names.
# Run it from a scratch virtual environment, not the project's (grpcio-tools pins protobuf < 7):
#   python3 -m venv /tmp/grpcgen && /tmp/grpcgen/bin/pip install grpcio-tools==1.75.1
#   PYTHON=/tmp/grpcgen/bin/python service/edges/oip_proto/generate.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
"${PYTHON:-python3}" -m grpc_tools.protoc -I"$here" --python_out="$here" --grpc_python_out="$here" \
    "$here/grpc_service.proto" "$here/model_config.proto"
rm -f "$here/model_config_pb2_grpc.py"  # model_config.proto declares no service
# protoc imports a sibling module by its bare name; here it is inside the tuneserve package. The .proto file
# names stay as published, so these descriptors are the same files tritonclient registers (one process may
# load both).
sed -i 's/^import \(grpc_service_pb2\|model_config_pb2\) as /from tuneserve.service.edges.oip_proto import \1 as /' \
    "$here"/*_pb2.py "$here"/*_pb2_grpc.py
