"""Wire edges: the gRPC modules are generated into `fedhl.v1` at build time; tensor payloads
are encoded by `fedhl.codec`. Protobuf types stay at the servicer and client edges."""
