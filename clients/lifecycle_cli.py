"""The model lifecycle, A/B statistics, rollouts and fault drills from the command line (registry RPCs):
`llmserve models load|drain|status|assignments|faults`, `llmserve experiments stats`, `llmserve rollout ...`."""

from __future__ import annotations

import json
import sys
import time

from google.protobuf import json_format

TERMINAL = {"load": ("ready", "refused"), "drain": ("retired",)}


def _dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def wait_state(stub, version: str, states: tuple[str, ...], timeout_s: float):
    """Polls GetModelVersionStatus (an operator's wait, once a second) until its state is one of `states`."""
    from llmserve.admin.v1 import registry_pb2
    from llmserve.registry.lifecycle import state_name
    deadline = time.monotonic() + timeout_s
    while True:
        status = stub.GetModelVersionStatus(registry_pb2.GetModelVersionStatusRequest(version=version), timeout=10)
        if state_name(status.state) in states or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def cmd_lifecycle(args, admin) -> int:
    """admin(args, "registry") -> (channel, stub)."""
    from llmserve.admin.v1 import registry_pb2
    from llmserve.registry.lifecycle import state_name
    channel, stub = admin(args, "registry")
    with channel:
        if args.action == "assignments":
            print(json.dumps([_dict(a) for a in stub.ListAssignments(registry_pb2.ListAssignmentsRequest(),
                                                                      timeout=10).assignments], indent=2))
            return 0
        if args.action == "load":
            reply = stub.LoadModelVersion(registry_pb2.LoadModelVersionRequest(version=args.version, pool=args.pool),
                                          timeout=10)
            print(f"{args.version}: assigned to {reply.assignment.name}")
        elif args.action == "drain":
            reply = stub.DrainModelVersion(registry_pb2.DrainModelVersionRequest(version=args.version,
                                                                                 pool=args.pool), timeout=10)
            print(f"{args.version}: draining on {reply.assignment.name}")
        if args.action in TERMINAL and args.wait:
            status = wait_state(stub, args.version, TERMINAL[args.action], args.wait)
        else:
            status = stub.GetModelVersionStatus(registry_pb2.GetModelVersionStatusRequest(version=args.version),
                                                timeout=10)
        print(f"{args.version}: {state_name(status.state)}")
        for p in status.placements:
            line = f"  {p.worker_id} ({p.pool}): {state_name(p.state)}, ~{p.estimated_bytes / 2**20:.1f} MiB"
            print(line + (f" - {p.reason}" if p.reason else ""))
        if args.action in TERMINAL and args.wait and state_name(status.state) not in TERMINAL[args.action][:1]:
            print(f"error: {args.version} is {state_name(status.state)}", file=sys.stderr)
            return 1
    return 0


def register(models_sub, admin_flags, admin) -> None:
    """Adds the lifecycle actions to `llmserve models`."""
    for action, text in (("load", "assign a version to a worker pool: its workers load it and report it ready"),
                         ("drain", "drain a version on a pool (requests finish), then unload it (retired)"),
                         ("status", "a version's state and its placement on each worker")):
        p = models_sub.add_parser(action, help=text)
        p.add_argument("version")
        if action != "status":
            p.add_argument("--pool", default="", help="pool name (worker.pool) or a worker id; default 'default'")
            p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                           help="wait up to this long for ready (load) or retired (drain); exit 1 otherwise")
        admin_flags(p)
        p.set_defaults(fn=lambda args: cmd_lifecycle(args, admin))
    p = models_sub.add_parser("assignments", help="which versions each pool loads and drains")
    admin_flags(p)
    p.set_defaults(fn=lambda args: cmd_lifecycle(args, admin))
    p = models_sub.add_parser("faults", help="fault injection for drills (all zero clears it)")
    p.add_argument("version")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of requests that fail (INTERNAL)")
    p.add_argument("--latency-ms", type=int, default=0, help="latency added before the first output")
    admin_flags(p)
    p.set_defaults(fn=lambda args: cmd_faults(args, admin))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def print_arm(arm) -> None:
    where = f"{arm.alias} -> {arm.version} (weight {arm.weight})" if arm.alias else arm.version
    errors = ", ".join(f"{k} {v}" for k, v in sorted(arm.errors.items())) or "none"
    print(f"{where}: {arm.requests} requests, errors: {errors}; TTFT p50/p95/p99 {_ms(arm.ttft.p50_s)}/"
          f"{_ms(arm.ttft.p95_s)}/{_ms(arm.ttft.p99_s)}; latency {_ms(arm.latency.p50_s)}/{_ms(arm.latency.p95_s)}/"
          f"{_ms(arm.latency.p99_s)}; tokens in/out {arm.prompt_tokens}/{arm.completion_tokens}; "
          f"${arm.cost_usd:.6f}; cache hits {arm.cache_hits}")


def cmd_experiments(args, admin) -> int:
    from llmserve.admin.v1 import registry_pb2
    channel, stub = admin(args, "registry")
    with channel:
        reply = stub.GetExperimentStats(registry_pb2.GetExperimentStatsRequest(alias=args.alias or "",
                                                                               version=args.version or ""),
                                        timeout=10)
    if args.json:
        print(json.dumps([_dict(a) for a in reply.arms], indent=2))
    else:
        for arm in reply.arms:
            print_arm(arm)
        print(f"(quantiles: {reply.method})")
    return 0


def cmd_rollout(args, admin) -> int:
    from llmserve.admin.v1 import registry_pb2 as r
    channel, stub = admin(args, "registry")
    with channel:
        if args.action == "start":
            slo = r.RolloutSlo(max_error_rate=args.max_error_rate, max_p95_ttft_s=args.max_p95_ttft,
                               max_p95_latency_s=args.max_p95_latency, max_p95_latency_ratio=args.max_latency_ratio,
                               max_p95_ttft_ratio=args.max_ttft_ratio)
            steps = [int(x) for x in args.steps.split(",")] if args.steps else []
            reply = stub.StartRollout(r.StartRolloutRequest(policy=r.RolloutPolicy(
                alias=args.alias, target_version=args.target, steps=steps, interval_s=args.interval,
                min_requests=args.min_requests, slo=slo)), timeout=10)
            rollout = reply.rollout
        elif args.action == "events":
            for e in stub.ListRolloutEvents(r.ListRolloutEventsRequest(alias=args.alias), timeout=10).events:
                when = time.strftime("%H:%M:%S", time.gmtime(e.time))
                print(f"{when} {e.decision:<8} canary {e.canary_percent:>3}%  {e.reason}")
            return 0
        elif args.action == "status":
            rollout = stub.GetRollout(r.GetRolloutRequest(alias=args.alias), timeout=10).rollout
        else:
            action = {"pause": r.ROLLOUT_ACTION_PAUSE, "resume": r.ROLLOUT_ACTION_RESUME,
                      "abort": r.ROLLOUT_ACTION_ABORT}[args.action]
            rollout = stub.ControlRollout(r.ControlRolloutRequest(alias=args.alias, action=action),
                                          timeout=10).rollout
    from llmserve.registry.rollout import percent
    p = rollout.policy
    print(f"{p.alias}: {r.RolloutState.Name(rollout.state).removeprefix('ROLLOUT_STATE_').lower()}, "
          f"{p.target_version} at {percent(rollout)}% (step {rollout.step + 1} of {list(p.steps)}), stable "
          f"{rollout.stable_version}" + (f"; {rollout.reason}" if rollout.reason else ""))
    return 0


def cmd_faults(args, admin) -> int:
    from llmserve.admin.v1 import registry_pb2
    channel, stub = admin(args, "registry")
    with channel:
        reply = stub.SetFaultInjection(registry_pb2.SetFaultInjectionRequest(fault=registry_pb2.FaultInjection(
            version=args.version, error_rate=args.error_rate, added_latency_ms=args.latency_ms)), timeout=10)
    f = reply.fault
    print(f"{f.version}: error rate {f.error_rate:.0%}, added latency {f.added_latency_ms} ms"
          + (" (cleared)" if not f.error_rate and not f.added_latency_ms else ""))
    return 0


def register_top(sub, admin_flags, admin) -> None:
    """`llmserve experiments` and `llmserve rollout`."""
    experiments = sub.add_parser("experiments", help="A/B statistics per version and per alias arm")
    experiments_sub = experiments.add_subparsers(dest="action", required=True)
    stats = experiments_sub.add_parser("stats", help="requests, errors, TTFT/latency quantiles, tokens, cost")
    which = stats.add_mutually_exclusive_group(required=True)
    which.add_argument("--alias")
    which.add_argument("--version")
    stats.add_argument("--json", action="store_true")
    admin_flags(stats)
    stats.set_defaults(fn=lambda args: cmd_experiments(args, admin))

    rollout = sub.add_parser("rollout", help="canary rollouts: start, status, pause, resume, abort, events")
    rollout_sub = rollout.add_subparsers(dest="action", required=True)
    start = rollout_sub.add_parser("start", help="move an alias to a version step by step, rolling back on SLO")
    start.add_argument("alias")
    start.add_argument("target")
    start.add_argument("--steps", default="", help="canary percentages, e.g. 5,25,50,100 (the default)")
    start.add_argument("--interval", type=float, default=0, help="seconds per step (default 60)")
    start.add_argument("--min-requests", type=int, default=0, help="canary requests per step (default 20)")
    start.add_argument("--max-error-rate", type=float, default=0, help="share of server errors (default 0.05)")
    start.add_argument("--max-p95-ttft", type=float, default=0, help="seconds (absolute)")
    start.add_argument("--max-p95-latency", type=float, default=0, help="seconds (absolute)")
    start.add_argument("--max-latency-ratio", type=float, default=0, help="canary p95 latency / stable's")
    start.add_argument("--max-ttft-ratio", type=float, default=0, help="canary p95 TTFT / stable's")
    admin_flags(start)
    for action in ("status", "pause", "resume", "abort", "events"):
        p = rollout_sub.add_parser(action)
        p.add_argument("alias")
        admin_flags(p)
    rollout.set_defaults(fn=lambda args: cmd_rollout(args, admin))
