"""`python -m server [flags]`: runs the OrderService gRPC server until SIGINT/SIGTERM."""

from infra import process
from server.platform.app import serve
from server.platform.settings import ServerSettings

if __name__ == "__main__":
    process.run(ServerSettings, serve, "OrderService")
