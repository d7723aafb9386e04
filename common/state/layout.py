"""The etcd key layout under the configured prefix (values are protobuf JSON, readable with etcdctl):

  registry/versions/<version>  ModelVersion
  registry/aliases/<name>      Alias
  tenants/<name>               Tenant
  keys/<sha256 of key>         ApiKey
  admin_keys/<sha256 of key>   AdminKey
  workers/<worker_id>          WorkerInfo (attached to the worker's lease)

The registry service writes versions, aliases, tenants and keys; workers write their own entry; everyone else
reads through watches (views.RegistryView).
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
