"""The etcd key layout under the configured prefix (values are protobuf JSON, readable with etcdctl):

  registry/versions/<version>  ModelVersion
  registry/aliases/<name>      Alias
  registry/assignments/<pool>  Assignment (what a worker pool, or one worker by id, loads and drains)
  registry/faults/<version>    FaultInjection (drills; absent: none)
  registry/rollouts/<alias>    Rollout (policy and the controller's progress)
  registry/rollout_events/<alias>/<time ns>  RolloutEvent
  registry/controller          the rollout controller's leader key (attached to its lease)
  placements/<worker>/<version>  Placement (a worker's state of a version, attached to the worker's lease)
  tenants/<name>               Tenant
  keys/<sha256 of key>         ApiKey
  admin_keys/<sha256 of key>   AdminKey
  workers/<worker_id>          WorkerInfo (attached to the worker's lease)
  schedulers/<scheduler_id>    SchedulerInfo (attached to the scheduler's lease)

The registry service writes versions, aliases, tenants and keys; workers and schedulers write their own entry;
everyone else reads through watches (views.RegistryView).
"""

from __future__ import annotations


class Paths:
    """The prefix of each record kind; every one ends with '/' and a record's key is prefix + its name."""

    def __init__(self, prefix: str):
        root = prefix.rstrip("/")
        self.versions = f"{root}/registry/versions/"
        self.aliases = f"{root}/registry/aliases/"
        self.keys = f"{root}/keys/"
        self.admin_keys = f"{root}/admin_keys/"
        self.tenants = f"{root}/tenants/"
        self.workers = f"{root}/workers/"
        self.schedulers = f"{root}/schedulers/"
        self.assignments = f"{root}/registry/assignments/"
        self.faults = f"{root}/registry/faults/"
        self.rollouts = f"{root}/registry/rollouts/"
        self.rollout_events = f"{root}/registry/rollout_events/"
        self.controller = f"{root}/registry/controller"
        self.placements = f"{root}/placements/"
