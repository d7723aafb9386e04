"""Registry process: the admin gRPC service over the etcd store."""

from __future__ import annotations

from llmserve.admin.v1 import registry_pb2_grpc
from llmserve.common import etcd
from llmserve.common.config import MeshConfig
from llmserve.common.server import Service
from llmserve.registry.service import RegistryServicer, registry_service_name
from llmserve.registry.store import RegistryStore


class RegistryApp:
    def __init__(self, config: MeshConfig):
        self.config = config
        self.client = etcd.connect(config.etcd)
        self.service = Service("registry", config.registry.host, config.registry.port, [registry_service_name()])
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryServicer(RegistryStore(self.client, config.etcd.prefix)), self.service.server)

    async def start(self) -> int:
        return await self.service.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.service.stop(grace_s)
        await self.client.close()
