"""etcd access (aetcd). What lives in etcd, and the watches over it, are in llmserve.common.state."""

from __future__ import annotations

import aetcd

from llmserve.common.config import EtcdConfig


def connect(cfg: EtcdConfig) -> aetcd.Client:
    # aetcd connects lazily on the first call and reconnects after failures.
    return aetcd.Client(host=cfg.host, port=cfg.port, timeout=cfg.timeout_s)
