"""The whole mesh in the test's event loop: registry, worker(s), scheduler and gateway on port 0, talking over
real gRPC channels to each other and to real etcd and Redis."""

from __future__ import annotations

import copy
import dataclasses

import grpc

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.clients.admin import WithAuth, registry_stub, tenant_stub
from llmserve.common import etcd as etcd_mod
from llmserve.common import tls
from llmserve.common.config import MeshConfig
from llmserve.common.state import keys
from llmserve.common.state.store import Store
from llmserve.gateway.app import GatewayApp
from llmserve.inference.v1 import inference_pb2_grpc
from llmserve.registry.app import RegistryApp
from llmserve.scheduler.app import SchedulerApp
from llmserve.worker.app import WorkerApp


def generate_version(version: str, source: str, context_length: int = 2048, family: str = "tiny",
                     quantization: str = ""):
    return rpb.ModelVersion(version=version, family=family, kind=rpb.MODEL_KIND_GENERATE, weights_source=source,
                            context_length=context_length, price_per_1k_prompt_tokens=0.1,
                            price_per_1k_completion_tokens=0.2, quantization=quantization)


def embed_version(version: str, source: str, context_length: int = 256, family: str = "embed"):
    return rpb.ModelVersion(version=version, family=family, kind=rpb.MODEL_KIND_EMBED, weights_source=source,
                            context_length=context_length)


@dataclasses.dataclass
class Mesh:
    config: MeshConfig
    registry: RegistryApp
    scheduler: SchedulerApp
    gateway: GatewayApp
    workers: list[WorkerApp]
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceStub
    admin: WithAuth  # RegistryService with the admin key
    tenants: WithAuth  # TenantService with the admin key
    api_key: str
    admin_key: str

    @property
    def auth(self):
        return (("authorization", f"Bearer {self.api_key}"),)

    async def add_worker(self, models: list[str], **worker_settings) -> WorkerApp:
        config = copy.deepcopy(self.config)
        config.worker.models = models
        for name, value in worker_settings.items():
            setattr(config.worker, name, value)
        worker = WorkerApp(config)
        await worker.start()
        self.workers.append(worker)
        await self.scheduler.view.workers.wait_for(lambda s: worker.worker_id in s, 10)
        return worker

    async def stop(self) -> None:
        await self.channel.close()
        await self.gateway.stop(0)
        await self.scheduler.stop(0)
        for worker in self.workers:
            await worker.stop(0)
        await self.registry.stop(0)


async def start_mesh(config: MeshConfig, versions: list, aliases: dict[str, list[tuple[str, int]]],
                     worker_models: list[list[str]]) -> Mesh:
    client = etcd_mod.connect(config.etcd)
    admin_key, _ = await keys.create_admin_key(Store(client, config.etcd.prefix).admin_keys, "tests")
    await client.close()
    registry = RegistryApp(config)
    registry_port = await registry.start()
    admin_channel = tls.aio_channel(f"127.0.0.1:{registry_port}", config.security, "client")
    admin = registry_stub(admin_channel, admin_key)
    tenants = tenant_stub(admin_channel, admin_key)
    for v in versions:
        await admin.CreateModelVersion(rpb.CreateModelVersionRequest(model_version=v))
    for name, targets in aliases.items():
        await admin.SetAlias(rpb.SetAliasRequest(alias=rpb.Alias(
            name=name, targets=[rpb.TrafficSplit(version=v, weight=w) for v, w in targets])))
    await tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name="test-tenant")))
    api_key = (await tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="test-tenant"))).key
    scheduler = SchedulerApp(config)
    config.gateway.scheduler_address = f"127.0.0.1:{await scheduler.start()}"
    gateway = GatewayApp(config)
    gateway_port = await gateway.start()
    channel = tls.aio_channel(f"127.0.0.1:{gateway_port}", config.security, "client")
    mesh = Mesh(config, registry, scheduler, gateway, [], channel, inference_pb2_grpc.InferenceServiceStub(channel),
                admin, tenants, api_key, admin_key)
    for models in worker_models:
        await mesh.add_worker(models)
    await gateway.view.keys.wait_for(lambda s: len(s) >= 1, 5)
    await gateway.view.tenants.wait_for(lambda s: "test-tenant" in s, 5)
    return mesh
