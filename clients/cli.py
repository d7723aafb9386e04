"""The `llmserve` command: run the local mesh, manage API keys and registry models, make quick calls."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from google.protobuf import json_format

DEFAULT_CONFIG = "deploy/local/llmserve.yaml"
DEFAULT_MODELS = "deploy/local/models.yaml"


def _config(args):
    from llmserve.common.config import load_config
    return load_config(args.config if args.config and os.path.exists(args.config) else None)


def cmd_run(args) -> int:
    from llmserve.common.launcher import run
    return run(args.config, args.models, args.state_dir)


def cmd_keys(args) -> int:
    from llmserve.clients import admin
    config = _config(args)
    if args.action == "create":
        key, record = admin.create_key(config, args.tenant, args.description)
        print(key)
        print(f"created {record.key_id} for tenant {record.tenant!r}; the key is shown only once", file=sys.stderr)
    elif args.action == "list":
        for record in admin.list_keys(config):
            state = "revoked" if record.revoked else "active"
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created))
            print(f"{record.key_id}  {record.tenant:20s}  {state:8s}  {created}  {record.description}")
    elif args.action == "revoke":
        record = admin.revoke_key(config, args.key_id)
        if record is None:
            print(f"no key with id {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {record.key_id} (tenant {record.tenant!r})")
    return 0


def cmd_models(args) -> int:
    import grpc

    from llmserve.admin.v1 import registry_pb2, registry_pb2_grpc
    from llmserve.clients import admin
    config = _config(args)
    address = args.registry or f"127.0.0.1:{config.registry.port}"
    if args.action == "apply":
        for line in admin.apply_models_file(address, args.file):
            print(line)
        return 0
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        versions = stub.ListModelVersions(registry_pb2.ListModelVersionsRequest(), timeout=10).model_versions
        aliases = stub.ListAliases(registry_pb2.ListAliasesRequest(), timeout=10).aliases
    print(json.dumps({"versions": [json_format.MessageToDict(v) for v in versions],
                      "aliases": [json_format.MessageToDict(a) for a in aliases]}, indent=2))
    return 0


def cmd_chat(args) -> int:
    from llmserve.clients.client import Client
    key = args.api_key or os.environ.get("LLMSERVE_API_KEY") or pathlib.Path(".llmserve/dev-api-key").read_text().strip()
    with Client(args.target, key) as client:
        for chunk in client.stream_chat(args.model, [("user", args.prompt)], max_tokens=args.max_tokens,
                                        temperature=args.temperature):
            for choice in chunk.choices:
                print(choice.delta.content, end="", flush=True)
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the whole mesh in the foreground (Ctrl-C stops it)")
    run.add_argument("--models", default=DEFAULT_MODELS, help="models file registered at start")
    run.add_argument("--state-dir", default=".llmserve", help="etcd data, logs, dev API key")
    run.set_defaults(fn=cmd_run)

    keys = sub.add_parser("keys", help="API keys (stored hashed in etcd)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--description", default="")
    keys_sub.add_parser("list", help="list keys (ids, never the keys)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    keys.set_defaults(fn=cmd_keys)

    models = sub.add_parser("models", help="registry versions and aliases")
    models.add_argument("--registry", help="registry address (default from the config)")
    models_sub = models.add_subparsers(dest="action", required=True)
    apply = models_sub.add_parser("apply", help="register versions and set aliases from a YAML file")
    apply.add_argument("file")
    models_sub.add_parser("list", help="print versions and aliases as JSON")
    models.set_defaults(fn=cmd_models)

    chat = sub.add_parser("chat", help="stream one chat answer from the gateway")
    chat.add_argument("prompt")
    chat.add_argument("--model", default="smollm2")
    chat.add_argument("--target", default="127.0.0.1:50051")
    chat.add_argument("--api-key", default="", help="default: $LLMSERVE_API_KEY, else .llmserve/dev-api-key")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(fn=cmd_chat)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
