"""Gateway tier speed, with h2load (nghttp2's C HTTP/2 load generator) as the load, so that the load tool is not
what limits: each server under test is pinned with taskset to one core (--core) and h2load to another.

Prints JSON, ours vs a floor in one run:
  - echo: a grpcio aio server answering CreateCompletion with a fixed response, and echo_metadata, the same with
    the initial metadata the gateway sends (x-request-id, x-llmserve-cache, ...): the floor of a Python grpcio
    server doing no work at all;
  - gateway_cache_hit: a response-cache hit for a tenant without limits (auth, validation, routing, the cache
    lookup, usage made durable before the answer, the request's log line, metrics and span);
  - gateway_cache_hit_limited: the same for a tenant with request and token limits (plus the admission script);
  - gateway_pass_through: a request the cache cannot serve (sampled, no seed) generating 1 token on the worker;
    its requests/s are the mesh's (the CPU worker limits them), and the gateway's own cost is its CPU time per
    request; the scheduler's CPU time per task in the same run gives scheduler_dispatch (tasks/s per core);
  - gateways: with --gateways 2, the cache-hit rate through one address (HAProxy, `launch.gateways`) with 1 and
    with 2 gateways, and the scaling expected from the per-process figure.
For each: p50/p99 latency at concurrency 1 (from h2load's per-request log), requests/s at --streams in flight,
and CPU µs per request of the pinned process (from /proc), which gives requests/s per core even on a machine
whose other work takes part of that core: requests/s per core = 1e6 / cpu_us_per_request.

Every gateway answer is checked: the gateway's own request counter must have counted as many OK answers (and
cache hits) as h2load received responses, since h2load cannot read gRPC trailers.

    python bench/gateway.py [--requests 10000] [--requests-c1 2000] [--streams 64] [--core 1] [--gateways 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
from google.protobuf import wrappers_pb2 as w

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.clients.admin import tenant_stub
from llmserve.common.net import free_port
from llmserve.common.server import SERVER_OPTIONS
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.local_mesh import LocalMesh, listening_pid

METHOD = "/llmserve.inference.v1.InferenceService/CreateCompletion"
CACHEABLE = pb.CreateCompletionRequest(model="smollm2", prompt="What is the capital of France?",
                                       max_tokens=w.Int32Value(value=8), temperature=w.FloatValue(value=0.0))
# Sampled without a seed: never cached; one generated token.
PASS_THROUGH = pb.CreateCompletionRequest(model="smollm2", prompt="Say one word.",
                                          max_tokens=w.Int32Value(value=1), temperature=w.FloatValue(value=1.0))
METADATA = (("x-request-id", "0123456789abcdef01234567"), ("x-llmserve-model-version", "smollm2-135m-instruct-v1"),
            ("x-llmserve-cache", "hit"))


class Echo(inference_pb2_grpc.InferenceServiceServicer):
    RESPONSE = pb.CreateCompletionResponse(
        id="cmpl-0", object="text_completion", created=1, model="smollm2-135m-instruct-v1",
        choices=[pb.CompletionChoice(index=0, text=" The capital of France is Paris.", finish_reason="stop")],
        usage=pb.Usage(prompt_tokens=7, completion_tokens=8, total_tokens=15))

    def __init__(self, metadata: bool):
        self.metadata = metadata

    async def CreateCompletion(self, request, context):
        if self.metadata:
            await context.send_initial_metadata(METADATA)
        return self.RESPONSE


async def serve_echo(port: int, metadata: bool) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(Echo(metadata), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def grpc_body(request, directory: pathlib.Path, name: str) -> pathlib.Path:
    """A gRPC message as h2load sends it: the 5-byte length prefix (uncompressed), then the protobuf."""
    data = request.SerializeToString()
    path = directory / f"{name}.bin"
    path.write_bytes(b"\0" + struct.pack(">I", len(data)) + data)
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, core: int) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, capture_output=True)


def wait_listening(port: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while (pid := listening_pid(port)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port}")
        time.sleep(0.1)
    return pid


class H2load:
    def __init__(self, core: int, workdir: pathlib.Path):
        self.binary = shutil.which("h2load")
        if self.binary is None:
            sys.exit("h2load not found: apt-get install nghttp2-client (deploy/local/install-system-deps.sh)")
        self.core, self.workdir = core, workdir
        self.version = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout.strip()

    def run(self, address: str, body: pathlib.Path, headers: list[str], *, requests: int, clients: int = 1,
            streams: int = 1) -> dict:
        log = self.workdir / "h2load.log"
        log.unlink(missing_ok=True)
        cmd = ["taskset", "-c", str(self.core), self.binary, "-c", str(clients), "-m", str(streams),
               "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"--log-file={log}"]
        for header in headers:
            cmd += ["-H", header]
        cmd += ["-n", str(requests)]
        out = subprocess.run([*cmd, f"http://{address}{METHOD}"], capture_output=True, text=True, timeout=600).stdout
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
        rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
        if not done or not rate:
            raise RuntimeError(f"h2load output not understood:\n{out}")
        durations = [int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip()]
        return {"succeeded": int(done.group(2)), "failed": int(done.group(3)),
                "requests_per_s": float(rate.group(1)), "durations_ms": durations}


def latency_summary(durations_ms: list[float]) -> dict:
    ordered = sorted(durations_ms)
    return {"p50_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3), "n": len(ordered)}


def gateway_counts(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts = {}
    for name, pattern in (("ok", r'llmserve_gateway_requests_total\{code="OK",method="CreateCompletion"\} (\S+)'),
                          ("hit", r'llmserve_gateway_response_cache_total\{result="hit"\} (\S+)')):
        found = re.search(pattern, text)
        counts[name] = float(found.group(1)) if found else 0.0
    return counts


def measure(h2: H2load, args, name: str, address: str, pid: int, body: pathlib.Path, headers: list[str],
            *, check_metrics: int | None = None, expect_hits: bool = False, c1: bool = True,
            requests: int | None = None) -> dict:
    """Latency at concurrency 1 and requests/s (and CPU per request of `pid`) at args.streams in flight."""
    pin(pid, args.core)
    before = gateway_counts(check_metrics) if check_metrics else None
    result: dict = {}
    if c1:
        h2.run(address, body, headers, requests=200)  # warm: connections, caches, the interpreter
        c1_run = h2.run(address, body, headers, requests=args.requests_c1)
        result["latency_c1"] = latency_summary(c1_run["durations_ms"])
    clients = max(1, args.streams // 4)
    used = cpu_seconds(pid)
    load = h2.run(address, body, headers, requests=requests or args.requests, clients=clients,
                  streams=args.streams // clients)
    used = cpu_seconds(pid) - used
    answered = load["succeeded"]
    result.update(requests_per_s=load["requests_per_s"], in_flight=args.streams, failed=load["failed"],
                  cpu_us_per_request=round(1e6 * used / max(1, answered), 1),
                  requests_per_s_per_core=round(answered / used, 1) if used else None)
    if check_metrics:
        after = gateway_counts(check_metrics)
        sent = load["succeeded"] + (200 + args.requests_c1 if c1 else 0)
        ok = after["ok"] - before["ok"]
        result["checked"] = {"grpc_ok": int(ok), "http_responses": sent,
                             **({"cache_hits": int(after["hit"] - before["hit"])} if expect_hits else {})}
        if ok < sent or (expect_hits and after["hit"] - before["hit"] < sent):
            raise RuntimeError(f"{name}: the gateway answered {ok} OK of at least {sent} responses "
                               f"({after['hit'] - before['hit']} cache hits): {result}")
    print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    return result


def make_limited_key(mesh: LocalMesh) -> str:
    with grpc.insecure_channel(mesh.address("registry")) as channel:
        admin = tenant_stub(channel, (mesh.state / "admin-key").read_text().strip())
        admin.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(
            name="bench-limited", requests_per_minute=100_000_000, tokens_per_minute=1_000_000_000)))
        return admin.CreateApiKey(tpb.CreateApiKeyRequest(tenant="bench-limited")).key


def prime(address: str, key: str) -> None:
    """The first call generates and fills the cache; the next must be a hit."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(3):
            response, call = stub.CreateCompletion.with_call(CACHEABLE, metadata=(("authorization", f"Bearer {key}"),),
                                                             timeout=300)
        if dict(call.initial_metadata()).get("x-llmserve-cache") != "hit":
            raise RuntimeError(f"no cache hit from {address}")


def run_mesh(args, h2: H2load, tmp: pathlib.Path, bodies: dict, echo_ports: dict) -> dict:
    results: dict = {}
    for name, port in echo_ports.items():
        results[name] = measure(h2, args, name, f"127.0.0.1:{port}", wait_listening(port), bodies["cacheable"], [])
    (tmp / "mesh").mkdir()
    with LocalMesh(tmp / "mesh", gateways=1) as mesh:
        key, limited = mesh.api_key, make_limited_key(mesh)
        gateway_pid = wait_listening(mesh.ports["gateway"])
        metrics_port = mesh.metrics_ports["gateway"]
        for name, api_key in (("gateway_cache_hit", key), ("gateway_cache_hit_limited", limited)):
            prime(mesh.gateway, api_key)
            results[name] = measure(h2, args, name, mesh.gateway, gateway_pid, bodies["cacheable"],
                                    [f"authorization: Bearer {api_key}"], check_metrics=metrics_port,
                                    expect_hits=True)
        scheduler_pid = wait_listening(mesh.ports["scheduler"])
        idle_cpu, idle_started = cpu_seconds(scheduler_pid), time.monotonic()
        time.sleep(5)  # its background work (load reports, watches, workers' cache events) is not per task
        idle_rate = (cpu_seconds(scheduler_pid) - idle_cpu) / (time.monotonic() - idle_started)
        scheduler_cpu, run_started = cpu_seconds(scheduler_pid), time.monotonic()
        passed = measure(h2, args, "gateway_pass_through", mesh.gateway, gateway_pid, bodies["pass_through"],
                         [f"authorization: Bearer {key}"], check_metrics=metrics_port, c1=False,
                         requests=args.pass_through_requests)
        scheduler_cpu = max(0.0, cpu_seconds(scheduler_pid) - scheduler_cpu
                            - idle_rate * (time.monotonic() - run_started))
        tasks = passed["checked"]["grpc_ok"]
        passed["note"] = ("requests/s is the mesh's, bounded by the CPU worker (SmolLM2-135M on shared cores); "
                          "requests_per_s_per_core is the gateway's own capacity for this path")
        results["gateway_pass_through"] = passed
        results["scheduler_dispatch"] = {
            "tasks": tasks, "cpu_s": round(scheduler_cpu, 3),
            "cpu_us_per_task": round(1e6 * scheduler_cpu / max(1, tasks), 1),
            "tasks_per_s_per_core": round(tasks / scheduler_cpu, 1) if scheduler_cpu else None,
            "idle_cpu_s_per_s": round(idle_rate, 4),
            "note": "the scheduler's CPU time over the pass-through run less its idle rate (it is not pinned; the "
                    "worker limits the rate, so this is its cost per routed task, not a saturated rate)"}
    return results


def run_gateways(args, h2: H2load, tmp: pathlib.Path, bodies: dict) -> dict:
    """Cache hits through one listening address (launch.gateways behind HAProxy) with 1 and with N gateways."""
    out: dict = {}
    for count in sorted({1, args.gateways}):
        (tmp / f"mesh-{count}").mkdir()
        with LocalMesh(tmp / f"mesh-{count}", gateways=count, launch_gateways=count > 1) as mesh:
            prime(mesh.front, mesh.api_key)
            for address in mesh.gateways:
                prime(address, mesh.api_key)
            pids = [wait_listening(int(a.rpartition(":")[2])) for a in mesh.gateways]
            for i, pid in enumerate(pids):  # one core each, as far as the machine has them
                subprocess.run(["taskset", "-a", "-p", "-c", str((args.core + i) % os.cpu_count()), str(pid)],
                               check=True, capture_output=True)
            used = [cpu_seconds(p) for p in pids]
            load = h2.run(mesh.front, bodies["cacheable"], [f"authorization: Bearer {mesh.api_key}"],
                          requests=args.requests, clients=max(count * 4, args.streams // 4), streams=4)
            used = [cpu_seconds(p) - u for p, u in zip(pids, used, strict=True)]
            out[f"{count}_gateway{'s' if count > 1 else ''}"] = {
                "requests_per_s": load["requests_per_s"], "failed": load["failed"],
                "cpu_s_per_gateway": [round(u, 2) for u in used],
                "share_per_gateway": [round(u / sum(used), 3) for u in used] if sum(used) else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000, help="requests of each throughput run")
    parser.add_argument("--pass-through-requests", type=int, default=300,
                        help="requests of the pass-through run (each generates on the CPU worker)")
    parser.add_argument("--requests-c1", type=int, default=2000, help="requests of each concurrency-1 run")
    parser.add_argument("--streams", type=int, default=64, help="requests in flight in the throughput runs")
    parser.add_argument("--core", type=int, default=max(0, (os.cpu_count() or 1) - 1),
                        help="the core the server under test is pinned to (h2load gets the one before it)")
    parser.add_argument("--gateways", type=int, default=2, help="also measure 1 vs N gateways behind one address "
                        "(HAProxy); 1: skip")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-metadata", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(serve_echo(args.echo_server, args.echo_metadata))
        return
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    echo_ports = {"echo": free_port(), "echo_metadata": free_port()}
    echoes = [subprocess.Popen([sys.executable, __file__, "--echo-server", str(echo_ports["echo"])]),
              subprocess.Popen([sys.executable, __file__, "--echo-server", str(echo_ports["echo_metadata"]),
                                "--echo-metadata"])]
    try:
        with tempfile.TemporaryDirectory(prefix="llmserve-bench-") as name:
            tmp = pathlib.Path(name)
            h2 = H2load((args.core - 1) % cores, tmp)
            bodies = {"cacheable": grpc_body(CACHEABLE, tmp, "cacheable"),
                      "pass_through": grpc_body(PASS_THROUGH, tmp, "pass_through")}
            results = run_mesh(args, h2, tmp, bodies, echo_ports)
            for echo in echoes:
                echo.terminate()
            scaling = run_gateways(args, h2, tmp, bodies) if args.gateways > 1 and shutil.which("haproxy") else None
    finally:
        for echo in echoes:
            echo.terminate()
            echo.wait()
    floor, hit, limited = results["echo"], results["gateway_cache_hit"], results["gateway_cache_hit_limited"]
    for name in ("gateway_cache_hit", "gateway_cache_hit_limited"):
        lat = results[name]["latency_c1"]
        results[name]["added_vs_echo_ms"] = {"p50": round(lat["p50_ms"] - floor["latency_c1"]["p50_ms"], 3),
                                             "p99": round(lat["p99_ms"] - floor["latency_c1"]["p99_ms"], 3)}
    per_core = hit["requests_per_s_per_core"] or 0
    report = {
        "load_generator": f"{h2.version} (C, HTTP/2; pinned to core {h2.core})",
        "setup": {"cores": cores, "server_core": args.core, "in_flight": args.streams, "requests": args.requests,
                  "requests_c1": args.requests_c1, "load_average_before": [round(x, 2) for x in load_before],
                  "load_average_after": [round(x, 2) for x in os.getloadavg()],
                  "note": "requests_per_s_per_core = 1e6 / CPU µs per request of the pinned process: other work on "
                          "the machine shares the core, so raw requests/s understate it; figures on a loaded "
                          "machine are noisy"},
        **results,
        "targets": {
            "cache_hit_2500_per_core": per_core >= 2500,
            "cache_hit_p50_added_under_1ms": hit["added_vs_echo_ms"]["p50"] < 1.0,
            "limited_p50_added_under_1ms": limited["added_vs_echo_ms"]["p50"] < 1.0,
        },
    }
    if scaling is not None:
        one = scaling["1_gateway"]["requests_per_s"]
        report["gateways"] = {
            **scaling,
            "expected": {f"{n}_gateways_requests_per_s": round(n * per_core, 1) for n in (2, 4, 8, 16)},
            "expected_note": ("n gateways on n free cores: n x the per-core cache-hit figure (each process is "
                              "independent; Redis and HAProxy are shared). On this machine the load generator, "
                              "Redis, HAProxy and the gateways share the cores, so the measured ratio "
                              f"({scaling.get(f'{args.gateways}_gateways', {}).get('requests_per_s', 0)} / {one}) "
                              "shows the balancing works, not the scaling a machine with the cores gets")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
