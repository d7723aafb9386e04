"""The capacity model of deploy/CAPACITY.md, computed from measured figures (deploy/capacity-inputs.json, taken
from bench/gateway.py and bench/redis_ops.py output) and published GPU figures (cited there).

    python deploy/capacity.py                      # prints the generated section
    python deploy/capacity.py --write              # rewrites it in deploy/CAPACITY.md (between the markers)
    python deploy/capacity.py --measured G.json R.json   # takes the measured figures from bench JSON first

tests/test_capacity.py checks that CAPACITY.md holds exactly what this script prints.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
INPUTS = HERE / "capacity-inputs.json"
DOCUMENT = HERE / "CAPACITY.md"
BEGIN, END = "<!-- capacity.py: begin (generated; edit deploy/capacity-inputs.json) -->", "<!-- capacity.py: end -->"


def ceil(x: float) -> int:
    return max(1, math.ceil(x - 1e-9))


def fmt(x: float) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"


class Model:
    def __init__(self, inputs: dict):
        self.i = inputs
        m, a = inputs["measured"], inputs["assumptions"]
        self.m, self.a = m, a
        self.util = a["target_utilization"]

    # ---- per tier, for `rps` requests/s at cache-hit rate `hit` ----

    def gateway_cores(self, rps: float, hit: float) -> float:
        m = self.m["gateway"]
        cpu_us = hit * m["cache_hit_limited_cpu_us"] + (1 - hit) * m["pass_through_cpu_us"]
        return rps * cpu_us / 1e6 / self.util

    def scheduler_cores(self, rps: float, hit: float) -> float:
        tasks = rps * (1 - hit) * self.a["tasks_per_miss"]
        return tasks * self.m["scheduler"]["cpu_us_per_task"] / 1e6 / self.util

    def cache_redis_shards(self, rps: float, hit: float) -> float:
        r = self.m["redis"]
        cpu_us = r["cache_get_cpu_us"] + (1 - hit) * r["cache_set_cpu_us"]
        return rps * cpu_us / 1e6 / self.util

    def accounting_redis_shards(self, rps: float, hit: float) -> float:
        r, a = self.m["redis"], self.a
        cpu_us = (hit * r["admit_cpu_us"] + (1 - hit) * (r["admit_full_cpu_us"] + r["reconcile_cpu_us"])
                  + r["usage_flush_cpu_us"] / a["requests_per_usage_flush"])
        return rps * cpu_us / 1e6 / self.util

    def watchers(self, gateways: int, schedulers: int, workers: int) -> int:
        return gateways + schedulers + workers  # one watch stream each on the registry prefix

    def gpus(self, rps: float, hit: float, output_tokens: int, tokens_per_s: float) -> float:
        return rps * (1 - hit) * output_tokens / (tokens_per_s * self.a["gpu_utilization"])

    # ---- tables ----

    def measured_table(self) -> str:
        m = self.m
        g, s, r = m["gateway"], m["scheduler"], m["redis"]
        rows = [
            ("gateway, cache hit (tenant with limits)", f"{fmt(g['cache_hit_limited_cpu_us'])} µs",
             f"{fmt(1e6 / g['cache_hit_limited_cpu_us'])} requests/s"),
            ("gateway, cache hit (no limits)", f"{fmt(g['cache_hit_cpu_us'])} µs",
             f"{fmt(1e6 / g['cache_hit_cpu_us'])} requests/s"),
            ("gateway, pass-through (1 generated token)", f"{fmt(g['pass_through_cpu_us'])} µs",
             f"{fmt(1e6 / g['pass_through_cpu_us'])} requests/s"),
            ("grpcio echo floor (no work)", f"{fmt(g['echo_cpu_us'])} µs", f"{fmt(1e6 / g['echo_cpu_us'])} requests/s"),
            ("scheduler, one routed task", f"{fmt(s['cpu_us_per_task'])} µs",
             f"{fmt(1e6 / s['cpu_us_per_task'])} tasks/s"),
            ("Redis: cache GET / SET", f"{fmt(r['cache_get_cpu_us'])} / {fmt(r['cache_set_cpu_us'])} µs",
             f"{fmt(1e6 / r['cache_get_cpu_us'])} / {fmt(1e6 / r['cache_set_cpu_us'])} ops/s"),
            ("Redis: admission (2 windows) / (4 windows + in-flight)",
             f"{fmt(r['admit_cpu_us'])} / {fmt(r['admit_full_cpu_us'])} µs",
             f"{fmt(1e6 / r['admit_cpu_us'])} / {fmt(1e6 / r['admit_full_cpu_us'])} ops/s"),
            ("Redis: settlement / usage flush", f"{fmt(r['reconcile_cpu_us'])} / {fmt(r['usage_flush_cpu_us'])} µs",
             f"{fmt(1e6 / r['reconcile_cpu_us'])} / {fmt(1e6 / r['usage_flush_cpu_us'])} ops/s"),
        ]
        out = ["| what (one core) | CPU per operation | one core |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        return "\n".join(out)

    def tiers_table(self, rps: float) -> str:
        out = [f"| tier at {fmt(rps)} requests/s | " + " | ".join(f"{int(h * 100)}% cache hits"
                                                              for h in self.a["hit_rates"]) + " |",
               "|---|" + "---|" * len(self.a["hit_rates"])]
        rows = {
            "gateway processes (1 core each)": lambda h: ceil(self.gateway_cores(rps, h)),
            "scheduler processes (1 core each)": lambda h: ceil(self.scheduler_cores(rps, h)),
            "cache Redis shards": lambda h: ceil(self.cache_redis_shards(rps, h)),
            "accounting Redis shards (primaries)": lambda h: ceil(self.accounting_redis_shards(rps, h)),
            "generation tasks/s": lambda h: round(rps * (1 - h) * self.a["tasks_per_miss"]),
        }
        for name, f in rows.items():
            out.append(f"| {name} | " + " | ".join(fmt(f(h)) for h in self.a["hit_rates"]) + " |")
        return "\n".join(out)

    def gpu_table(self, rps: float) -> str:
        hits = self.a["hit_rates"]
        out = ["| worker (source) | tokens in, out | output tokens/s per worker | "
               + " | ".join(f"workers, {int(h * 100)}% hits" for h in hits) + " |",
               "|---|---|---|" + "---|" * len(hits)]
        for w in self.i["workers"]:
            for mix in w["mixes"]:
                counts = [fmt(ceil(self.gpus(rps, h, mix["output"], mix["tokens_per_s"]))) for h in hits]
                out.append(f"| {w['name']} [{w['ref']}] | {mix['input']}, {mix['output']} | "
                           f"{fmt(mix['tokens_per_s'])} | " + " | ".join(counts) + " |")
        return "\n".join(out)

    def phases_table(self) -> str:
        a = self.a
        hit = a["phase_hit_rate"]
        ref = self.i["workers"][a["phase_worker"][0]]
        mix = ref["mixes"][a["phase_worker"][1]]
        out = [f"| phase | regions | gateways | schedulers | cache / accounting Redis shards | {ref['name']} "
               f"workers ({mix['input']}, {mix['output']}) | watch streams on etcd | first limit reached |",
               "|---|---|---|---|---|---|---|---|"]
        for phase in a["phases"]:
            rps, regions = phase["rps"], phase["regions"]
            per = rps / regions
            g = ceil(self.gateway_cores(per, hit))
            s = ceil(self.scheduler_cores(per, hit))
            c = ceil(self.cache_redis_shards(per, hit))
            acc = ceil(self.accounting_redis_shards(per, hit))
            w = ceil(self.gpus(per, hit, mix["output"], mix["tokens_per_s"]))
            watch = self.watchers(g, s, w)
            out.append(f"| {fmt(rps)} requests/s | {regions} | {fmt(g)} | {fmt(s)} | {c} / {acc} | {fmt(w)} | "
                       f"{fmt(watch)} | {self.first_limit(per, hit, s, c, acc, watch)} |")
        return "\n".join(out + ["", f"Per region; cache-hit rate {int(hit * 100)}%. A tier needing more than one "
                                     "process or shard has passed its single-instance limit there."])

    def first_limit(self, rps: float, hit: float, schedulers: int, cache: int, accounting: int, watch: int) -> str:
        limits = []
        if schedulers > 1:
            limits.append(f"one scheduler process ({fmt(self.util * 1e6 / self.m['scheduler']['cpu_us_per_task'])} "
                          "tasks/s at the target utilization)")
        if accounting > 1:
            limits.append("one accounting Redis shard")
        if cache > 1:
            limits.append("one cache Redis shard")
        if watch > self.a["etcd_watch_streams_comfortable"]:
            limits.append("etcd watch streams")
        return "; then ".join(limits) if limits else "none (one of each suffices)"

    def latency_table(self) -> str:
        total = 0.0
        out = ["| hop (p95 budget, one region) | ms | from |", "|---|---|---|"]
        for hop in self.a["latency_budget_ms"]:
            ms = hop["ms"] if "ms" in hop else self.m["gateway"][hop["measured"]]
            total += ms
            out.append(f"| {hop['hop']} | {fmt(ms)} | {hop['from']} |")
        verdict = "within" if total < 200 else "over"
        out.append(f"| **total to the first token** | **{fmt(total)}** | {verdict} the 200 ms target |")
        return "\n".join(out)

    def render(self) -> str:
        a = self.a
        return "\n\n".join([
            BEGIN,
            "### Measured per-core figures",
            self.measured_table(),
            f"Sources: {self.m['source']}",
            f"### Replicas per tier for {fmt(a['target_rps'])} requests/s",
            f"Each process or shard planned at {int(self.util * 100)}% of one core (headroom for bursts and for "
            f"losing one); {a['tasks_per_miss']} task per request that misses the cache; a usage flush per "
            f"{a['requests_per_usage_flush']} requests; every tenant with limits (the costlier admission).",
            self.tiers_table(a["target_rps"]),
            "### Workers for the requests that miss the cache",
            f"Output tokens/s per worker at its maximum throughput, planned at {int(a['gpu_utilization'] * 100)}% "
            "of it, so that queueing stays short enough for the latency budget below.",
            self.gpu_table(a["target_rps"]),
            "### Latency budget (p95, to the first token of a request that misses the cache)",
            self.latency_table(),
            "### Phases",
            self.phases_table(),
            END,
        ])


def from_bench(inputs: dict, gateway_json: pathlib.Path, redis_json: pathlib.Path) -> dict:
    """The measured section from bench/gateway.py and bench/redis_ops.py output."""
    g, r = json.loads(gateway_json.read_text()), json.loads(redis_json.read_text())
    inputs["measured"]["gateway"].update(
        cache_hit_cpu_us=g["gateway_cache_hit"]["cpu_us_per_request"],
        cache_hit_limited_cpu_us=g["gateway_cache_hit_limited"]["cpu_us_per_request"],
        pass_through_cpu_us=g["gateway_pass_through"]["cpu_us_per_request"],
        echo_cpu_us=g["echo"]["cpu_us_per_request"],
        cache_hit_p99_ms=g["gateway_cache_hit_limited"]["latency_c1"]["p99_ms"],
        cache_hit_p50_ms=g["gateway_cache_hit_limited"]["latency_c1"]["p50_ms"])
    inputs["measured"]["scheduler"]["cpu_us_per_task"] = g["scheduler_dispatch"]["cpu_us_per_task"]
    inputs["measured"]["redis"].update({f"{name}_cpu_us": r[name]["cpu_us_per_op"] for name in (
        "cache_get", "cache_set", "admit", "admit_full", "reconcile", "usage_flush")})
    return inputs


def replace_section(document: str, section: str) -> str:
    head, _, rest = document.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + section + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the section in deploy/CAPACITY.md")
    parser.add_argument("--measured", nargs=2, type=pathlib.Path, metavar=("GATEWAY_JSON", "REDIS_JSON"),
                        help="update capacity-inputs.json from bench/gateway.py and bench/redis_ops.py output")
    args = parser.parse_args()
    inputs = json.loads(INPUTS.read_text())
    if args.measured:
        inputs = from_bench(inputs, *args.measured)
        INPUTS.write_text(json.dumps(inputs, indent=2) + "\n")
    section = Model(inputs).render()
    if args.write:
        DOCUMENT.write_text(replace_section(DOCUMENT.read_text(), section))
    else:
        sys.stdout.write(section + "\n")


if __name__ == "__main__":
    main()
