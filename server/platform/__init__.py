"""The gRPC platform: app, settings, request path, auth, TLS, metrics, health, reflection."""
