"""Wire formats: tensor payloads (safetensors) and, generated beside it, the gRPC modules
(`fedhl.v1`). Protobuf types stay at the servicer and client edges."""
