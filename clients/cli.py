"""The `llmserve` command: run the local mesh; manage models, tenants, API keys and usage; make quick calls."""

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
PRIORITIES = {"interactive": 1, "standard": 2, "batch": 3}


def _config(args):
    from llmserve.common.config import load_config
    return load_config(args.config if args.config and os.path.exists(args.config) else None)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """Seconds of "3600", "90s", "15m", "12h" or "30d" (argparse type of --ttl)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = int(number) * DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use seconds or 90s, 15m, 12h, 30d") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: a lifetime is 0 (never expires) or more")
    return seconds


def _find_admin_key(args) -> str:
    key = args.admin_key or os.environ.get("LLMSERVE_ADMIN_KEY", "")
    if not key and pathlib.Path(".llmserve/admin-key").exists():
        key = pathlib.Path(".llmserve/admin-key").read_text().strip()
    return key


def _admin_key(args) -> str:
    key = _find_admin_key(args)
    if not key:
        sys.exit("no admin key: pass --admin-key, set LLMSERVE_ADMIN_KEY, or run from the folder of `make run`")
    return key


def _admin(args, which: str):
    from llmserve.clients import admin
    from llmserve.common import tls
    config = _config(args)
    channel = tls.channel(args.registry or f"127.0.0.1:{config.registry.port}", config.security)
    make = {"tenants": admin.tenant_stub, "admin-keys": admin.admin_key_stub}.get(which, admin.registry_stub)
    return channel, make(channel, _admin_key(args))


def _when(unix: int, never: str = "never") -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(unix)) if unix else never


def _print(message) -> None:
    print(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2))


def cmd_run(args) -> int:
    from llmserve.clients.launcher import run
    return run(args.config, args.models, args.state_dir)


def cmd_admin_key(args) -> int:
    from llmserve.admin.v1 import admin_keys_pb2 as a
    from llmserve.clients.admin import create_admin_key
    from llmserve.common.state.keys import state
    if args.action == "create" and (args.bootstrap or not _find_admin_key(args)):
        # Bootstrap (no admin key yet, e.g. a fresh cluster): the record goes straight into etcd.
        print(create_admin_key(_config(args), args.description, args.ttl or 0))
        print("bootstrap admin key written to etcd; it is shown only once", file=sys.stderr)
        return 0
    channel, stub = _admin(args, "admin-keys")
    with channel:
        if args.action == "create":
            made = stub.CreateAdminKey(a.CreateAdminKeyRequest(description=args.description,
                                                               ttl_seconds=args.ttl or 0), timeout=10)
            print(made.key)
            print(f"{made.admin_key.key_id}, expires {_when(made.admin_key.expires)}; the key is shown only once",
                  file=sys.stderr)
        elif args.action == "list":
            for k in stub.ListAdminKeys(a.ListAdminKeysRequest(), timeout=10).admin_keys:
                print(f"{k.key_id}  {state(k):8s}  created {_when(k.created)}  expires {_when(k.expires):16s}  "
                      f"{k.description}")
        else:
            revoked = stub.RevokeAdminKey(a.RevokeAdminKeyRequest(key_id=args.key_id), timeout=10).admin_key
            print(f"revoked {revoked.key_id}")
    return 0


def _tenant_from_args(args, base=None):
    from llmserve.admin.v1 import tenants_pb2
    tenant = base or tenants_pb2.Tenant(name=args.name)
    if args.allowed_models is not None:
        del tenant.allowed_models[:]
        tenant.allowed_models.extend(m for m in args.allowed_models.split(",") if m)
    if args.max_priority is not None:
        tenant.max_priority = PRIORITIES[args.max_priority]
    for flag, field in (("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute"), ("budget_usd", "budget_usd"),
                        ("max_concurrent", "max_concurrent_requests")):
        if getattr(args, flag) is not None:
            setattr(tenant, field, getattr(args, flag))
    if args.budget_period is not None:
        tenant.budget_period = tenants_pb2.BUDGET_PERIOD_DAY if args.budget_period == "day" else \
            tenants_pb2.BUDGET_PERIOD_MONTH
    return tenant


def cmd_tenants(args) -> int:
    from llmserve.admin.v1 import tenants_pb2 as t
    channel, stub = _admin(args, "tenants")
    with channel:
        if args.action == "create":
            _print(stub.CreateTenant(t.CreateTenantRequest(tenant=_tenant_from_args(args)), timeout=10).tenant)
        elif args.action == "update":
            current = stub.GetTenant(t.GetTenantRequest(name=args.name), timeout=10).tenant
            _print(stub.UpdateTenant(t.UpdateTenantRequest(tenant=_tenant_from_args(args, current)),
                                     timeout=10).tenant)
        else:
            for tenant in stub.ListTenants(t.ListTenantsRequest(), timeout=10).tenants:
                _print(tenant)
    return 0


def cmd_keys(args) -> int:
    from llmserve.admin.v1 import tenants_pb2 as t
    channel, stub = _admin(args, "tenants")
    with channel:
        if args.action in ("create", "rotate"):
            if args.action == "create":
                made = stub.CreateApiKey(t.CreateApiKeyRequest(
                    tenant=args.tenant, description=args.description, requests_per_minute=args.rpm or 0,
                    tokens_per_minute=args.tpm or 0, ttl_seconds=args.ttl or 0,
                    max_concurrent_requests=args.max_concurrent or 0), timeout=10)
            else:
                made = stub.RotateApiKey(t.RotateApiKeyRequest(key_id=args.key_id), timeout=10)
            print(made.key)
            print(f"{made.api_key.key_id} for tenant {made.api_key.tenant!r}, expires {_when(made.api_key.expires)}; "
                  "the key is shown only once", file=sys.stderr)
        elif args.action == "list":
            from llmserve.common.state.keys import state
            for k in stub.ListApiKeys(t.ListApiKeysRequest(tenant=args.tenant or ""), timeout=10).api_keys:
                print(f"{k.key_id}  {k.tenant:20s}  {state(k):8s}  {_when(k.created)}  expires {_when(k.expires)}  "
                      f"rpm={k.requests_per_minute} tpm={k.tokens_per_minute} "
                      f"concurrent={k.max_concurrent_requests}  {k.description}")
        else:
            revoked = stub.RevokeApiKey(t.RevokeApiKeyRequest(key_id=args.key_id), timeout=10).api_key
            print(f"revoked {revoked.key_id} (tenant {revoked.tenant!r})")
    return 0


def cmd_usage(args) -> int:
    from llmserve.admin.v1 import tenants_pb2 as t
    channel, stub = _admin(args, "tenants")
    with channel:
        _print(stub.GetUsage(t.GetUsageRequest(tenant=args.tenant, start_day=args.start_day or "",
                                               end_day=args.end_day or ""), timeout=10))
    return 0


def cmd_models(args) -> int:
    from llmserve.admin.v1 import registry_pb2
    from llmserve.clients import admin
    if args.action == "apply":
        config = _config(args)
        for line in admin.apply_models_file(args.registry or f"127.0.0.1:{config.registry.port}", _admin_key(args),
                                            args.file, config.security):
            print(line)
        return 0
    channel, stub = _admin(args, "registry")
    with channel:
        versions = stub.ListModelVersions(registry_pb2.ListModelVersionsRequest(), timeout=10).model_versions
        aliases = stub.ListAliases(registry_pb2.ListAliasesRequest(), timeout=10).aliases
    print(json.dumps({"versions": [json_format.MessageToDict(v) for v in versions],
                      "aliases": [json_format.MessageToDict(a) for a in aliases]}, indent=2))
    return 0


def cmd_certs(args) -> int:
    from llmserve.common import certs
    out = args.out or _config(args).security.tls_dir
    written = certs.ensure(out, args.role or certs.MESH_ROLES, args.san or ())
    print(f"{out}: {'wrote ' + ', '.join(written) if written else 'every certificate is already there and current'}"
          f" (CA {certs.ca_path(out)}; keys 0600)")
    return 0


def cmd_health(args) -> int:
    """Exit 0 when the service at the address is SERVING (a probe that speaks the mesh's TLS, unlike kubelet's)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmserve.common import tls
    with tls.channel(args.address, _config(args).security, server_name=args.server_name) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                          timeout=args.timeout)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_chat(args) -> int:
    from llmserve.clients.client import Client
    from llmserve.common import tls
    key = (args.api_key or os.environ.get("LLMSERVE_API_KEY")
           or pathlib.Path(".llmserve/dev-api-key").read_text().strip())
    with Client(args.target, key, credentials=tls.channel_credentials(_config(args).security, "client")) as client:
        for chunk in client.stream_chat(args.model, [("user", args.prompt)], max_tokens=args.max_tokens,
                                        temperature=args.temperature):
            for choice in chunk.choices:
                print(choice.delta.content, end="", flush=True)
    print()
    return 0


def _admin_flags(parser) -> None:
    parser.add_argument("--registry", help="registry address (default from the config)")
    parser.add_argument("--admin-key", default="", help="default: $LLMSERVE_ADMIN_KEY, else .llmserve/admin-key")


def _tenant_flags(parser) -> None:
    parser.add_argument("name")
    parser.add_argument("--allowed-models", help="comma-separated names or patterns (empty: all)")
    parser.add_argument("--max-priority", choices=list(PRIORITIES))
    parser.add_argument("--rpm", type=int, help="requests per minute (0: unlimited)")
    parser.add_argument("--tpm", type=int, help="tokens per minute (0: unlimited)")
    parser.add_argument("--budget-usd", type=float, help="budget per period (0: unlimited)")
    parser.add_argument("--budget-period", choices=["day", "month"])
    parser.add_argument("--max-concurrent", type=int,
                        help="sequences (prompts x n) running at once (0: gateway default, -1: no cap)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the whole mesh in the foreground (Ctrl-C stops it)")
    run.add_argument("--models", default=DEFAULT_MODELS, help="models file registered at start")
    run.add_argument("--state-dir", default=".llmserve", help="etcd data, logs, dev API key, admin key")
    run.set_defaults(fn=cmd_run)

    admin_key = sub.add_parser("admin-key", help="admin keys: list, create (optionally expiring), revoke")
    admin_key_sub = admin_key.add_subparsers(dest="action", required=True)
    admin_create = admin_key_sub.add_parser(
        "create", help="create an admin key and print it once: through the registry with an admin key, else "
                       "(bootstrap) straight into etcd")
    admin_create.add_argument("--description", default="")
    admin_create.add_argument("--ttl", type=duration, help="lifetime: seconds, or 90m, 12h, 30d (default: never "
                                                           "expires)")
    admin_create.add_argument("--bootstrap", action="store_true",
                              help="write it straight into etcd even when an admin key is at hand")
    admin_revoke = admin_key_sub.add_parser("revoke", help="revoke an admin key by its id (not the last active one)")
    admin_revoke.add_argument("key_id")
    for p in (admin_create, admin_revoke, admin_key_sub.add_parser("list", help="ids, state, expiry")):
        _admin_flags(p)
    admin_key.set_defaults(fn=cmd_admin_key)

    tenants = sub.add_parser("tenants", help="tenants: model access, priority cap, limits, budget")
    tenants_sub = tenants.add_subparsers(dest="action", required=True)
    for action in ("create", "update"):
        p = tenants_sub.add_parser(action)
        _tenant_flags(p)
        _admin_flags(p)
    _admin_flags(tenants_sub.add_parser("list"))
    tenants.set_defaults(fn=cmd_tenants)

    keys = sub.add_parser("keys", help="API keys (stored hashed; shown once)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--description", default="")
    create.add_argument("--rpm", type=int, help="requests per minute of this key")
    create.add_argument("--tpm", type=int, help="tokens per minute of this key")
    create.add_argument("--ttl", type=duration, help="lifetime: seconds, or 90m, 12h, 30d (default: never expires)")
    create.add_argument("--max-concurrent", type=int,
                        help="sequences (prompts x n) this key may run at once (0: gateway default, -1: no cap)")
    listing = keys_sub.add_parser("list", help="list keys (ids, never the keys)")
    listing.add_argument("--tenant")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    rotate = keys_sub.add_parser("rotate", help="replace a key by a new one (same tenant and limits)")
    rotate.add_argument("key_id")
    for p in (create, listing, revoke, rotate):
        _admin_flags(p)
    keys.set_defaults(fn=cmd_keys)

    usage = sub.add_parser("usage", help="usage and cost of a tenant per day, key and model version")
    usage.add_argument("--tenant", required=True)
    usage.add_argument("--start-day", help="YYYY-MM-DD (default today)")
    usage.add_argument("--end-day", help="YYYY-MM-DD (default start day)")
    _admin_flags(usage)
    usage.set_defaults(fn=cmd_usage)

    models = sub.add_parser("models", help="registry versions and aliases")
    models_sub = models.add_subparsers(dest="action", required=True)
    apply = models_sub.add_parser("apply", help="register versions and set aliases from a YAML file")
    apply.add_argument("file")
    _admin_flags(apply)
    _admin_flags(models_sub.add_parser("list", help="print versions and aliases as JSON"))
    models.set_defaults(fn=cmd_models)
    from llmserve.clients import lifecycle_cli
    lifecycle_cli.register(models_sub, _admin_flags, _admin)
    lifecycle_cli.register_top(sub, _admin_flags, _admin)

    chat = sub.add_parser("chat", help="stream one chat answer from the gateway")
    chat.add_argument("prompt")
    chat.add_argument("--model", default="smollm2")
    chat.add_argument("--target", default="127.0.0.1:50051")
    chat.add_argument("--api-key", default="", help="default: $LLMSERVE_API_KEY, else .llmserve/dev-api-key")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(fn=cmd_chat)

    certs = sub.add_parser("certs", help="a local CA and one certificate per service, for the mesh's mTLS")
    certs.add_argument("--out", default="", help="folder (default security.tls_dir, .llmserve/tls)")
    certs.add_argument("--role", action="append", help="only these roles (repeatable; default every service, rest "
                                                       "and client); the role is the certificate's common name")
    certs.add_argument("--san", action="append", help="one more DNS name or IP the certificates are valid for "
                                                      "(repeatable; localhost, 127.0.0.1 and the role always are)")
    certs.set_defaults(fn=cmd_certs)

    health = sub.add_parser("health", help="check a service's gRPC health over the mesh's TLS (exit 0: SERVING)")
    health.add_argument("address", help="HOST:PORT")
    health.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    health.add_argument("--server-name", default="", help="name to check in the server's certificate")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(fn=cmd_health)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as exc:  # grpc.RpcError and friends: one line, not a traceback
        import grpc
        if isinstance(exc, grpc.RpcError):
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
