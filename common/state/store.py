"""The mesh's record kinds as typed collections under one etcd prefix (the key layout is in layout.py)."""

from __future__ import annotations

import aetcd

from llmserve.admin.v1 import keys_pb2, registry_pb2, tenants_pb2
from llmserve.common.state.collection import Collection
from llmserve.common.state.layout import Paths
from llmserve.dispatch.v1 import scheduler_pb2, worker_pb2


class Store:
    """Reads and writes of every record kind; API and admin keys are named by the SHA-256 of the key (keys.py)."""

    def __init__(self, client: aetcd.Client, prefix: str):
        self.client = client
        self.paths = Paths(prefix)
        self.versions = Collection(client, self.paths.versions, registry_pb2.ModelVersion, lambda v: v.version)
        self.aliases = Collection(client, self.paths.aliases, registry_pb2.Alias, lambda a: a.name)
        self.tenants = Collection(client, self.paths.tenants, tenants_pb2.Tenant, lambda t: t.name)
        self.api_keys = Collection(client, self.paths.keys, keys_pb2.ApiKey, lambda k: k.key_hash,
                                   order=lambda k: (k.tenant, k.created))
        self.admin_keys = Collection(client, self.paths.admin_keys, keys_pb2.AdminKey, lambda k: k.key_hash,
                                     order=lambda k: (k.created, k.key_id))
        self.workers = Collection(client, self.paths.workers, worker_pb2.WorkerInfo, lambda w: w.worker_id)
        self.schedulers = Collection(client, self.paths.schedulers, scheduler_pb2.SchedulerInfo,
                                     lambda s: s.scheduler_id)
        self.assignments = Collection(client, self.paths.assignments, registry_pb2.Assignment, lambda a: a.name)
        self.placements = Collection(client, self.paths.placements, registry_pb2.Placement,
                                     lambda p: f"{p.worker_id}/{p.version}")
        self.faults = Collection(client, self.paths.faults, registry_pb2.FaultInjection, lambda f: f.version)
        self.rollouts = Collection(client, self.paths.rollouts, registry_pb2.Rollout, lambda r: r.policy.alias)
        self.rollout_events = Collection(client, self.paths.rollout_events, registry_pb2.RolloutEvent,
                                         lambda e: f"{e.alias}/{int(e.time * 1e9):020d}")
