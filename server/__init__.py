"""The gRPC OrderService server."""
