"""What the gRPC server and the worker share to run in production: the Temporal
connection, logging, and metrics."""
