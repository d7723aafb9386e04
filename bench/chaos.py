"""Chaos: the whole mesh as `make run` starts it (etcd, both Redis roles, registry, worker, scheduler, two gateways,
as real processes under the launcher; a tiny random Llama with the real SmolLM2 tokenizer), steady traffic
(streaming and unary completions and chats for a tenant without a budget and one with a budget), then SIGKILL of
one part at a time, brought back by the launcher. Prints JSON: per fault, the requests sent and failed (by status
code) until the mesh was error-free again, the first success after the kill, when the error rate went back to 0,
when the killed part served again, and whether any acknowledged usage or spend was lost (GetUsage and the
budget's period spend against the sum of the usage of successful responses). How each figure is taken:
tests/helpers/chaos.py.

    python bench/chaos.py [--faults worker,scheduler,gateway,redis,etcd] [--rounds 1] [--duration 4]
                          [--streams 2] [--unary 1] [--max-tokens 12]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.helpers import chaos
from tests.helpers.tiny_models import build_tiny_llama


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(chaos.DEFAULT_FAULTS),
                        help=f"comma-separated, in order; from {', '.join(chaos.FAULTS)}")
    parser.add_argument("--rounds", type=int, default=1, help="how many times the whole list runs")
    parser.add_argument("--duration", type=float, default=4.0,
                        help="seconds of error-free traffic before each kill (and of the baseline)")
    parser.add_argument("--quiet", type=float, default=2.0,
                        help="seconds without a failure after which a fault counts as recovered")
    parser.add_argument("--streams", type=int, default=2, help="concurrent streaming completions per tenant")
    parser.add_argument("--unary", type=int, default=1, help="concurrent unary requests per tenant")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--dir", help="run in this (new) folder and keep it: the mesh's logs are in mesh/state/logs")
    args = parser.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(chaos.FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(chaos.FAULTS)}")
    settings = chaos.Settings(steady_s=args.duration, quiet_s=args.quiet, streams=args.streams, unary=args.unary,
                              max_tokens=args.max_tokens)
    with contextlib.ExitStack() as stack:
        tmp = args.dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="llmserve-chaos-"))
        model = build_tiny_llama(pathlib.Path(tmp) / "tiny-llama")
        started = time.monotonic()
        with chaos.chaos_mesh(pathlib.Path(tmp) / "mesh", model) as mesh:
            up_s = time.monotonic() - started
            report = asyncio.run(chaos.run(mesh, faults * args.rounds, settings,
                                           log=lambda line: print(f"[chaos] {line}", file=sys.stderr, flush=True)))
    report["mesh_start_s"] = round(up_s, 1)
    report["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
