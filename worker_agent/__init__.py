"""eplb worker agent: runs inside every engine rank (torch + grpcio + protobuf only)."""
