#!/usr/bin/env python3
"""A real gRPC peer (grpcio) for canary's end-to-end tests, without
generated code: one unary method /canary.Echo/Who whose reply is
"<version> <pod>".

  echo.py serve --listen 10.77.0.11:8080 --version v1 --pod checkout-v1-a
                [--unavailable-first N] [--log PATH]
  echo.py call --target 10.96.0.10:8080 [--metadata k=v ...] [--calls N]

`call` prints one JSON object: {"ok": n, "codes": {"OK": n, ...},
"by_version": {...}}.
"""
import argparse
import json
import sys
import threading
from concurrent import futures

import grpc

METHOD = "/canary.Echo/Who"


def serve(args):
    lock = threading.Lock()
    calls = {"n": 0}

    def who(request, context):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps({"call": n, "metadata": dict(context.invocation_metadata())}) + "\n")
        if n <= args.unavailable_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return f"{args.version} {args.pod}".encode()

    handler = grpc.method_handlers_generic_handler(
        "canary.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    for addr in args.listen:
        server.add_insecure_port(addr)
    server.start()
    server.wait_for_termination()


def call(args):
    channel = grpc.insecure_channel(args.target, options=[("grpc.enable_retries", 0)])
    who = channel.unary_unary(METHOD)
    metadata = [tuple(m.split("=", 1)) for m in args.metadata]
    report = {"ok": 0, "codes": {}, "by_version": {}}
    for _ in range(args.calls):
        try:
            reply = who(b"", metadata=metadata, timeout=10)
            code = "OK"
            report["ok"] += 1
            version = reply.decode().split()[0]
            report["by_version"][version] = report["by_version"].get(version, 0) + 1
        except grpc.RpcError as e:
            code = e.code().name
        report["codes"][code] = report["codes"].get(code, 0) + 1
    print(json.dumps(report))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", action="append", required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--pod", required=True)
    s.add_argument("--unavailable-first", type=int, default=0)
    s.add_argument("--log")
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--metadata", action="append", default=[])
    c.add_argument("--calls", type=int, default=1)
    args = p.parse_args()
    serve(args) if args.cmd == "serve" else call(args)


if __name__ == "__main__":
    sys.exit(main())
