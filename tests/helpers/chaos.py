"""Chaos against a real local mesh: steady traffic through the gateways, one part SIGKILLed at a time, and the
bill checked afterwards. Shared by bench/chaos.py (the report) and tests/test_chaos.py (its bounded form).

The mesh is `llmserve run` (LocalMesh) with two gateways, the accounting and the cache Redis of `make run`, and a
tiny random Llama (real SmolLM2 tokenizer), so a restarted worker is back in seconds.

Per fault: SIGKILL the process that listens on the part's port, let the launcher bring it back, and measure from
the kill: requests sent and failed (by status code) until the mesh is error-free again, the first success of a
request sent after the kill, when the error rate went back to 0, and when the killed part itself answered again.
Then the traffic pauses and the usage the gateways acknowledged (the usage of every successful response) is
compared with what TenantService/GetUsage reports, and with the budgeted tenant's period spend.

What counts as lost: a counter GetUsage reports below the acknowledged sum. A failed request may still be billed
for what it computed before it failed (the gateway settles what was computed), so GetUsage may exceed the
acknowledged sums by at most what the failed requests could have used ("unacknowledged"); more than that would
be double counting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import statistics
import time
import typing

import grpc
import yaml
from google.protobuf import wrappers_pb2 as w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.admin.v1 import tenants_pb2, tenants_pb2_grpc
from llmserve.common import usage
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc
from tests.helpers.local_mesh import LocalMesh

VERSION = "tiny-chaos-v1"
ALIAS = "tiny"
PRICE_PROMPT_1K, PRICE_COMPLETION_1K = 0.01, 0.02  # high enough that every request costs micro-dollars
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "cost_micro_usd")
FAULTS = ("worker", "scheduler", "gateway", "registry", "redis", "redis-cache", "etcd")
DEFAULT_FAULTS = ("worker", "scheduler", "gateway", "redis", "etcd")
GRPC_PARTS = {"worker", "scheduler", "gateway", "gateway-2", "registry"}
TENANTS = ("dev", "metered")  # dev: no budget (limits fail open); metered: a budget (fails closed, has spend)
PROBE = "probe"  # a tenant whose fresh keys check, after each fault, that changes in etcd still reach the gateways


@dataclasses.dataclass
class Settings:
    steady_s: float = 4.0  # traffic before each kill (and the baseline)
    quiet_s: float = 2.0  # error-free traffic after the last failure that counts as recovered
    recover_timeout_s: float = 90.0  # a fault not recovered by then is reported as such
    settle_timeout_s: float = 20.0  # how long GetUsage may take to show what was acknowledged
    streams: int = 2  # concurrent streaming completions per tenant
    unary: int = 1  # concurrent unary requests (completion and chat, alternating) per tenant
    max_tokens: int = 12
    think_s: float = 0.05  # pause between one lane's requests (keeps 2 shared cores from saturating)
    request_timeout_s: float = 15.0


def models_file(directory: pathlib.Path, model_dir: pathlib.Path) -> pathlib.Path:
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump({
        "versions": [{"version": VERSION, "family": "tiny", "kind": "MODEL_KIND_GENERATE", "engine": "torch",
                      "weights_source": f"file:{model_dir}", "context_length": 512,
                      "price_per_1k_prompt_tokens": PRICE_PROMPT_1K,
                      "price_per_1k_completion_tokens": PRICE_COMPLETION_1K}],
        "aliases": [{"name": ALIAS, "targets": [{"version": VERSION, "weight": 100}]}],
    }))
    return path


def chaos_mesh(directory: str | os.PathLike, model_dir: pathlib.Path) -> LocalMesh:
    """The mesh of `make run` with two gateways and both Redis roles, serving the tiny Llama at `model_dir`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return LocalMesh(directory, models_file=models_file(directory, model_dir), gateways=2, cache_redis=True,
                     # One torch thread: two would spin against the gateways for the 2 cores (20x slower here).
                     worker={"models": [VERSION], "lease_ttl_s": 3, "dtype": "float32", "max_num_seqs": 16,
                             "num_threads": 1, "num_kv_blocks": 256},
                     # Short reservations: a killed gateway's open budget reservations are released in seconds.
                     gateway={"reservation_ttl_s": 1.0}, start_timeout_s=300)


# ---- traffic ----

@dataclasses.dataclass
class Outcome:
    tenant: str
    kind: str
    started: float
    ended: float
    code: str  # "OK" or the status code name
    usage: dict[str, int]  # acknowledged usage (successes only)
    detail: str = ""  # a failure's status message


class Traffic:
    """Lanes of requests through a client-side round-robin over every gateway (a load balancer's behaviour:
    a gateway that does not answer is skipped), each lane sending its next request when the last one ended."""

    def __init__(self, gateways: list[str], keys: dict[str, str], settings: Settings):
        self.settings = settings
        self.keys = keys
        target = "ipv4:" + ",".join(gateways)
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.outcomes: list[Outcome] = []
        self.running = asyncio.Event()
        self.inflight: dict[int, float] = {}  # request number -> when it was sent
        self._lanes: list[asyncio.Task] = []
        self._n = 0

    def start(self) -> None:
        s = self.settings
        for tenant in self.keys:
            self._lanes += [asyncio.create_task(self._lane(tenant, "stream")) for _ in range(s.streams)]
            self._lanes += [asyncio.create_task(self._lane(tenant, "unary")) for _ in range(s.unary)]
        self.running.set()

    async def pause(self) -> None:
        """Stops sending and waits until no request is in flight."""
        self.running.clear()
        while self.inflight:
            await asyncio.sleep(0.02)

    def stalled(self, older_than_s: float) -> int:
        """Requests in flight for longer than older_than_s (hung somewhere, not failed)."""
        now = time.monotonic()
        return sum(now - sent > older_than_s for sent in self.inflight.values())

    def resume(self) -> None:
        self.running.set()

    async def close(self) -> None:
        for lane in self._lanes:
            lane.cancel()
        await asyncio.gather(*self._lanes, return_exceptions=True)
        await self.channel.close()

    async def _lane(self, tenant: str, kind: str) -> None:
        metadata = (("authorization", f"Bearer {self.keys[tenant]}"),)
        while True:
            await self.running.wait()
            self._n += 1
            n, started = self._n, time.monotonic()
            self.inflight[n] = started
            try:
                code, used = await self._send(kind, n, metadata)
            except grpc.aio.AioRpcError as exc:
                code, used, detail = exc.code().name, {}, (exc.details() or "")[:200]
            else:
                detail = ""
            finally:
                del self.inflight[n]
            self.outcomes.append(Outcome(tenant, kind, started, time.monotonic(), code, used, detail))
            await asyncio.sleep(self.settings.think_s if code == "OK" else max(self.settings.think_s, 0.1))

    async def _send(self, kind: str, n: int, metadata) -> tuple[str, dict[str, int]]:
        s = self.settings
        params = dict(model=ALIAS, max_tokens=w.Int32Value(value=s.max_tokens), temperature=w.FloatValue(value=0.8),
                      ignore_eos=True, skip_cache=True)
        prompt = f"Request {n}: tell me about the number {n % 97} and its neighbours."
        if kind == "stream":
            last = None
            async for chunk in self.stub.StreamCompletion(pb.StreamCompletionRequest(prompt=prompt, **params),
                                                          metadata=metadata, timeout=s.request_timeout_s):
                if chunk.HasField("usage"):
                    last = chunk.usage
            if last is None:
                return "NO_USAGE", {}
            return "OK", _acknowledged(last)
        if n % 2:
            response = await self.stub.CreateCompletion(pb.CreateCompletionRequest(prompt=prompt, **params),
                                                        metadata=metadata, timeout=s.request_timeout_s)
        else:
            response = await self.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
                messages=[pb.ChatMessage(role="user", content=prompt)], **params), metadata=metadata,
                timeout=s.request_timeout_s)
        return "OK", _acknowledged(response.usage)


def _acknowledged(u) -> dict[str, int]:
    return {"requests": 1, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cost_micro_usd": usage.cost_micro_usd(u.prompt_tokens, u.completion_tokens, PRICE_PROMPT_1K,
                                                   PRICE_COMPLETION_1K)}


# ---- the bill ----

class Ledger:
    """Acknowledged usage (from the outcomes) against GetUsage, per tenant, at quiet moments."""

    def __init__(self, mesh: LocalMesh, admin_key: str):
        self.channel = grpc.aio.insecure_channel(mesh.address("registry"))
        self.stub = tenants_pb2_grpc.TenantServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {admin_key}"),)
        self.first_day = usage.today()

    async def recorded(self) -> dict[str, dict[str, int]]:
        """tenant -> counters (and "spend_micro_usd") as GetUsage reports them now."""
        out = {}
        end = usage.today()
        for tenant in TENANTS:
            reply = await self.stub.GetUsage(tenants_pb2.GetUsageRequest(
                tenant=tenant, start_day=self.first_day.isoformat(), end_day=end.isoformat()),
                metadata=self.metadata, timeout=5)
            rows = [r for r in reply.rows if r.model_version == VERSION]
            out[tenant] = {"requests": sum(r.requests for r in rows),
                           "prompt_tokens": sum(r.prompt_tokens for r in rows),
                           "completion_tokens": sum(r.completion_tokens for r in rows),
                           "cost_micro_usd": round(sum(r.cost_usd for r in rows) * usage.MICRO),
                           "spend_micro_usd": round(reply.period_spend_usd * usage.MICRO)}
        return out

    async def settle(self, acked: dict[str, dict[str, int]], timeout_s: float) -> dict[str, dict[str, int]]:
        """GetUsage once it shows at least what was acknowledged and the metered spend equals its recorded cost
        (open budget reservations of a killed gateway released), or what it shows at the timeout."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, dict[str, int]] = {}
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                last = await self.recorded()
                covered = all(last[t][c] >= acked[t][c] for t in TENANTS for c in COUNTERS)
                if covered and last["metered"]["spend_micro_usd"] == last["metered"]["cost_micro_usd"]:
                    return last
            if time.monotonic() > deadline:
                return last
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        await self.channel.close()


def acknowledged(outcomes: typing.Iterable[Outcome]) -> dict[str, dict[str, int]]:
    sums = {t: dict.fromkeys(COUNTERS, 0) for t in TENANTS}
    for o in outcomes:
        for name, value in o.usage.items():
            sums[o.tenant][name] += value
    return sums


def compare(acked: dict, recorded: dict, failed: typing.Sequence[Outcome], settings: Settings,
            prompt_bound: int = 64) -> dict:
    """Lost (recorded below acknowledged), unacknowledged (above it: failed requests billed for what they
    computed), whether that excess fits what the failed requests could have used, and spend against usage."""
    out: dict[str, typing.Any] = {}
    for tenant in TENANTS:
        a, r = acked[tenant], recorded.get(tenant, {})
        fails = [o for o in failed if o.tenant == tenant]
        bound = {"requests": len(fails), "prompt_tokens": len(fails) * prompt_bound,
                 "completion_tokens": len(fails) * settings.max_tokens}
        bound["cost_micro_usd"] = usage.cost_micro_usd(bound["prompt_tokens"], bound["completion_tokens"],
                                                       PRICE_PROMPT_1K, PRICE_COMPLETION_1K)
        lost = {c: max(0, a[c] - r.get(c, 0)) for c in COUNTERS}
        extra = {c: max(0, r.get(c, 0) - a[c]) for c in COUNTERS}
        entry = {"acknowledged": a, "lost": {c: v for c, v in lost.items() if v},
                 "unacknowledged": {c: v for c, v in extra.items() if v},
                 "double_counted": any(extra[c] > bound[c] for c in COUNTERS)}
        if tenant == "metered":
            spend = r.get("spend_micro_usd", 0)
            entry["spend_micro_usd"] = spend
            entry["spend_lost_micro_usd"] = max(0, a["cost_micro_usd"] - spend)
            entry["spend_minus_usage_cost_micro_usd"] = spend - r.get("cost_micro_usd", 0)
        out[tenant] = entry
    out["ok"] = all(not out[t]["lost"] and not out[t]["double_counted"] for t in TENANTS) and \
        out["metered"]["spend_lost_micro_usd"] == 0 and out["metered"]["spend_minus_usage_cost_micro_usd"] == 0
    return out


def delta(now: dict, before: dict) -> dict:
    return {t: {c: now.get(t, {}).get(c, 0) - before.get(t, {}).get(c, 0) for c in (*COUNTERS, "spend_micro_usd")}
            for t in TENANTS}


# ---- faults ----

async def _serving(mesh: LocalMesh, part: str) -> bool:
    port = mesh.ports[part]
    if part in GRPC_PARTS:
        async with grpc.aio.insecure_channel(mesh.address(part)) as channel:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        return False
    if part.startswith("redis"):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True  # etcd: accepting clients
    return False


async def _watch_restart(mesh: LocalMesh, part: str, old_pid: int, since: float, timeout_s: float
                         ) -> float | None:
    """Seconds from the kill until a new process of the part serves."""
    while time.monotonic() - since < timeout_s:
        pid = mesh.pid(part)
        if pid is not None and pid != old_pid and await _serving(mesh, part):
            return time.monotonic() - since
        await asyncio.sleep(0.1)
    return None


async def inject(mesh: LocalMesh, traffic: Traffic, fault: str, settings: Settings) -> dict:
    """Kills the part with traffic running; returns the fault's figures once it is error-free again."""
    part = fault
    pid = mesh.pid(part)
    if pid is None:
        raise RuntimeError(f"nothing listens on the {part} port {mesh.ports[part]}")
    first = len(traffic.outcomes)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    restart = asyncio.create_task(_watch_restart(mesh, part, pid, killed, settings.recover_timeout_s))
    # Recovered: quiet_s without a failure, after a success of a request sent after the kill.
    recovered = False
    while time.monotonic() - killed < settings.recover_timeout_s:
        await asyncio.sleep(0.1)
        seen = traffic.outcomes[first:]
        failures = [o for o in seen if o.code != "OK"]
        since = max((o.ended for o in failures), default=killed)
        fresh_ok = any(o.code == "OK" and o.started > since for o in seen)
        if fresh_ok and time.monotonic() - since >= settings.quiet_s and restart.done() and \
                not traffic.stalled(settings.quiet_s):
            recovered = True
            break
    restarted_s = await restart if restart.done() else None
    if not restart.done():
        restart.cancel()
    seen = traffic.outcomes[first:]
    failures = [o for o in seen if o.code != "OK"]
    last_failure = max((o.ended for o in failures), default=None)
    first_ok = min((o.ended for o in seen if o.code == "OK" and o.started > killed), default=None)
    window_end = max(last_failure or killed, first_ok or killed)
    in_window = [o for o in seen if o.started <= window_end]
    before = [o.ended - o.started for o in traffic.outcomes[:first][-50:] if o.code == "OK"]
    if os.environ.get("LLMSERVE_CHAOS_TIMELINE"):  # debugging: every request of the fault, relative to the kill
        with open(os.environ["LLMSERVE_CHAOS_TIMELINE"], "a") as f:
            for o in traffic.outcomes[first - 20:]:
                f.write(f"{fault} {o.tenant:8} {o.kind:6} {o.started - killed:7.2f} {o.ended - killed:7.2f} "
                        f"{o.code}\n")
    return {
        "fault": fault,
        "recovered": recovered,
        "requests_in_window": len(in_window),
        "failed_in_window": len(failures),
        "status_codes": dict(collections.Counter(o.code for o in failures)),
        "failure_messages": sorted({o.detail for o in failures})[:3],
        "failed_by_tenant": dict(collections.Counter(o.tenant for o in failures)),
        "first_success_s": _rounded(first_ok, killed),
        "error_free_after_s": _rounded(last_failure, killed) if failures else 0.0,
        "restarted_s": round(restarted_s, 2) if restarted_s is not None else None,
        "latency_before_p50_s": round(statistics.median(before), 2) if before else None,
        "slowest_in_window_s": round(max((o.ended - o.started for o in in_window), default=0.0), 2),
        "_failures": failures,
    }


def _rounded(t: float | None, since: float) -> float | None:
    return None if t is None else round(t - since, 2)


async def _steady(traffic: Traffic, seconds: float, timeout_s: float, before: str) -> None:
    """Traffic for `seconds`, and at least until the mesh is error-free for that long."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        recent = [o for o in traffic.outcomes if o.ended > now - seconds]
        if now - started >= seconds and recent and all(o.code == "OK" for o in recent) and \
                not traffic.stalled(seconds):
            return
        if now - started > timeout_s:
            failed = [o for o in recent if o.code != "OK"]
            raise RuntimeError(f"before {before}: the mesh does not serve without errors: "
                               f"{collections.Counter(o.code for o in failed)}, {traffic.stalled(seconds)} requests "
                               f"hung; e.g. {failed[0].detail if failed else ''!r}")


async def keys_for(mesh: LocalMesh) -> tuple[str, dict[str, str]]:
    """(admin key, tenant -> API key): dev (made by the launcher) and metered (a budget; made here)."""
    admin_key = (mesh.state / "admin-key").read_text().strip()
    metadata = (("authorization", f"Bearer {admin_key}"),)
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        stub = tenants_pb2_grpc.TenantServiceStub(channel)
        await stub.CreateTenant(tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(
            name="metered", budget_usd=1000.0)), metadata=metadata, timeout=10)
        created = await stub.CreateApiKey(tenants_pb2.CreateApiKeyRequest(tenant="metered", description="chaos"),
                                          metadata=metadata, timeout=10)
        await stub.CreateTenant(tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(name=PROBE)),
                                metadata=metadata, timeout=10)
    return admin_key, {"dev": mesh.api_key, "metered": created.key}


async def new_key_served_s(mesh: LocalMesh, admin_key: str, timeout_s: float) -> float | None:
    """Seconds until an API key made now is served by every gateway (their etcd watches work), or None."""
    metadata = (("authorization", f"Bearer {admin_key}"),)
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        created = await tenants_pb2_grpc.TenantServiceStub(channel).CreateApiKey(
            tenants_pb2.CreateApiKeyRequest(tenant=PROBE, description="chaos probe"), metadata=metadata, timeout=10)
    started = time.monotonic()
    request = pb.CreateCompletionRequest(model=ALIAS, prompt="probe", max_tokens=w.Int32Value(value=1),
                                         skip_cache=True)
    for gateway in mesh.gateways:
        async with grpc.aio.insecure_channel(gateway) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while True:
                try:
                    await stub.CreateCompletion(request, metadata=(("authorization", f"Bearer {created.key}"),),
                                                timeout=5)
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() - started > timeout_s:
                        return None
                    await asyncio.sleep(0.05)
    return round(time.monotonic() - started, 2)


async def run(mesh: LocalMesh, faults: typing.Sequence[str], settings: Settings,
              log: typing.Callable[[str], None] = lambda _: None) -> dict:
    """The chaos report: a fault-free baseline, then each fault with its bill."""
    admin_key, keys = await keys_for(mesh)
    # The gateways learn the new tenant and key through their etcd watch.
    await asyncio.sleep(0.5)
    traffic = Traffic(mesh.gateways, keys, settings)
    ledger = Ledger(mesh, admin_key)
    report: dict[str, typing.Any] = {"settings": dataclasses.asdict(settings), "faults": []}
    try:
        traffic.start()
        await _steady(traffic, settings.steady_s, settings.recover_timeout_s, "the baseline")
        await traffic.pause()
        acked = acknowledged(traffic.outcomes)
        recorded = await ledger.settle(acked, settings.settle_timeout_s)
        baseline = list(traffic.outcomes)
        report["baseline"] = {"requests": len(baseline), "failed": sum(o.code != "OK" for o in baseline),
                              "usage": (compare(acked, recorded, [o for o in baseline if o.code != "OK"],
                                                       settings))}
        log(f"baseline: {len(baseline)} requests, usage ok={report['baseline']['usage']['ok']}")
        before, checkpoint = recorded, len(traffic.outcomes)
        for fault in faults:
            traffic.resume()
            await _steady(traffic, settings.steady_s, settings.recover_timeout_s, fault)
            result = await inject(mesh, traffic, fault, settings)
            await traffic.pause()
            period = traffic.outcomes[checkpoint:]
            acked = acknowledged(period)
            now = await ledger.settle(_plus(acked, before), settings.settle_timeout_s)
            failures = result.pop("_failures")
            result["new_key_served_s"] = await new_key_served_s(mesh, admin_key, settings.recover_timeout_s)
            result["usage"] = (compare(acked, delta(now, before), [o for o in period if o.code != "OK"],
                                              settings))
            log(f"{fault}: {len(failures)} failed, first success {result['first_success_s']} s, error-free after "
                f"{result['error_free_after_s']} s, restarted in {result['restarted_s']} s, usage ok="
                f"{result['usage']['ok']}")
            report["faults"].append(result)
            before, checkpoint = now, len(traffic.outcomes)
        report["ok"] = report["baseline"]["usage"]["ok"] and all(
            f["recovered"] and f["usage"]["ok"] for f in report["faults"])
        report["requests_total"] = len(traffic.outcomes)
        return report
    finally:
        await traffic.close()
        await ledger.close()


def _plus(acked: dict, before: dict) -> dict:
    return {t: {c: acked[t][c] + before.get(t, {}).get(c, 0) for c in COUNTERS} for t in TENANTS}

