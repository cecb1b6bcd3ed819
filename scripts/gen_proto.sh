set -e
cd "$1"
tmp=$(mktemp -d)
mkdir -p "$tmp/crowdtrain/protocol"
cp protocol/coordinator.proto "$tmp/crowdtrain/protocol/"
.venv/bin/python -m grpc_tools.protoc -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" "$tmp/crowdtrain/protocol/coordinator.proto"
cp "$tmp"/crowdtrain/protocol/coordinator_pb2*.py* protocol/
rm -rf "$tmp"
