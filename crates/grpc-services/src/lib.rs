//! gRPC servers for containerd services (being written).
