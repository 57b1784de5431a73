"""Generated gRPC/protobuf code for the eplb wire contract (see proto/)."""
