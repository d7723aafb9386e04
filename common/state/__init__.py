"""The mesh's shared state in etcd: one layer that every service reads and the registry writes.

  layout      where each record kind lives under the configured prefix (`Paths`)
  codec       protobuf JSON values (`encode`, `decoder`)
  collection  one typed collection of records under a prefix (`Collection`)
  store       the mesh's collections: versions, aliases, tenants, API keys, admin keys, workers, schedulers
              (`Store`)
  keys        API and admin keys: generation, SHA-256 hashing, lookup, revocation
  watcher     a prefix mirrored by an etcd watch that keeps its last snapshot (`PrefixWatcher`)
  views       the watched, read-only view services route by (`RegistryView`, `Resolution`)
"""
