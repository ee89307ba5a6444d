#!/usr/bin/env python3
"""One unary gRPC call with Python's grpcio (gRPC C-core) over a unix socket.

    grpc_unary.py SOCKET METHOD REQUEST_HEX

The channel target is `unix:SOCKET` with no authority override, so C-core sends the
percent-encoded socket path as :authority, as kubelet-adjacent tools in Python, C++
and Ruby do. Prints the response message as hex; on failure prints the gRPC status
code and details to stderr and exits 1. Request and response are raw protobuf bytes
(no generated stubs): the Rust test encodes and decodes them.
"""
import sys

import grpc


def main() -> int:
    socket, method, request_hex = sys.argv[1:4]
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        call = channel.unary_unary(method)
        try:
            response = call(bytes.fromhex(request_hex), timeout=20)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(response.hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
