"""TenantService: tenants, their API keys and their usage (admin plane, hosted by the registry process)."""

from __future__ import annotations

import datetime
import re
import time

from llmserve.admin.v1 import tenants_pb2, tenants_pb2_grpc
from llmserve.common import usage
from llmserve.common.errors import already_exists, invalid_argument, not_found
from llmserve.common.logs import get_logger
from llmserve.common.state import keys
from llmserve.common.state.store import Store
from llmserve.inference.v1 import inference_pb2

log = get_logger(__name__)

TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # whole names only (fullmatch: "$" admits "a\n")
MAX_USAGE_DAYS = 93


def validate_tenant(t: tenants_pb2.Tenant) -> tenants_pb2.Tenant:
    t = tenants_pb2.Tenant.FromString(t.SerializeToString())
    if not TENANT_RE.fullmatch(t.name):
        raise invalid_argument(f"tenant.name={t.name!r} is invalid: use 1-64 lowercase letters, digits, '-' or '_'")
    for field in ("requests_per_minute", "tokens_per_minute"):
        if getattr(t, field) < 0:
            raise invalid_argument(f"tenant.{field}={getattr(t, field)} must be >= 0 (0: unlimited)")
    if t.max_concurrent_requests < -1:
        raise invalid_argument(f"tenant.max_concurrent_requests={t.max_concurrent_requests} must be >= -1 (0: the "
                               "gateway's default, gateway.max_concurrent_requests_per_tenant; -1: no cap)")
    if t.budget_usd < 0:
        raise invalid_argument(f"tenant.budget_usd={t.budget_usd} must be >= 0 (0: unlimited)")
    if t.max_priority not in inference_pb2.Priority.values():
        raise invalid_argument(f"tenant.max_priority={t.max_priority} is unknown")
    if t.budget_period not in tenants_pb2.BudgetPeriod.values():
        raise invalid_argument(f"tenant.budget_period={t.budget_period} is unknown")
    if any(not p for p in t.allowed_models):
        raise invalid_argument("tenant.allowed_models must not contain empty patterns")
    return t


def _day(field: str, value: str, default: datetime.date) -> datetime.date:
    if not value:
        return default
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise invalid_argument(f"{field}={value!r} is not a day: use YYYY-MM-DD") from None


class TenantServicer(tenants_pb2_grpc.TenantServiceServicer):
    def __init__(self, store: Store, redis_client):
        self.store = store
        self.redis = redis_client

    async def _tenant(self, name: str) -> tenants_pb2.Tenant:
        tenant = await self.store.tenants.get(name)
        if tenant is None:
            raise not_found(f"tenant {name!r} does not exist; ListTenants shows the tenants")
        return tenant

    async def CreateTenant(self, request, context):
        tenant = validate_tenant(request.tenant)
        tenant.created = int(time.time())
        if not await self.store.tenants.create(tenant):
            raise already_exists(f"tenant {tenant.name!r} already exists; UpdateTenant changes its settings")
        log.info("tenant created", tenant_name=tenant.name)
        return tenants_pb2.CreateTenantResponse(tenant=tenant)

    async def GetTenant(self, request, context):
        return tenants_pb2.GetTenantResponse(tenant=await self._tenant(request.name))

    async def ListTenants(self, request, context):
        return tenants_pb2.ListTenantsResponse(tenants=await self.store.tenants.list())

    async def UpdateTenant(self, request, context):
        tenant = validate_tenant(request.tenant)
        tenant.created = (await self._tenant(tenant.name)).created
        await self.store.tenants.put(tenant)
        log.info("tenant updated", tenant_name=tenant.name)
        return tenants_pb2.UpdateTenantResponse(tenant=tenant)

    async def CreateApiKey(self, request, context):
        await self._tenant(request.tenant)
        if request.requests_per_minute < 0 or request.tokens_per_minute < 0:
            raise invalid_argument("requests_per_minute and tokens_per_minute must be >= 0 (0: tenant limit only)")
        if request.max_concurrent_requests < -1:
            raise invalid_argument(f"max_concurrent_requests={request.max_concurrent_requests} must be >= -1 (0: the "
                                   "gateway's default per key, gateway.max_concurrent_requests_per_key; -1: no cap)")
        try:
            key, record = await keys.create_api_key(
                self.store.api_keys, request.tenant, request.description, request.requests_per_minute,
                request.tokens_per_minute, ttl_s=request.ttl_seconds,
                max_concurrent_requests=request.max_concurrent_requests)
        except ValueError as exc:
            raise invalid_argument(str(exc)) from None
        log.info("api key created", tenant_name=record.tenant, key_id=record.key_id, expires=record.expires)
        return tenants_pb2.CreateApiKeyResponse(api_key=record, key=key)

    async def ListApiKeys(self, request, context):
        records = [k for k in await self.store.api_keys.list() if not request.tenant or k.tenant == request.tenant]
        return tenants_pb2.ListApiKeysResponse(api_keys=records)

    async def _key(self, key_id: str):
        record = await keys.api_key_by_id(self.store.api_keys, key_id)
        if record is None:
            raise not_found(f"API key {key_id!r} does not exist; ListApiKeys shows the key ids")
        return record

    async def RevokeApiKey(self, request, context):
        await self._key(request.key_id)
        record = await keys.revoke_api_key(self.store.api_keys, request.key_id)
        log.info("api key revoked", key_id=record.key_id)
        return tenants_pb2.RevokeApiKeyResponse(api_key=record)

    async def RotateApiKey(self, request, context):
        old = await self._key(request.key_id)
        if old.revoked:
            raise invalid_argument(f"API key {old.key_id} is revoked; create a new key instead")
        # The successor lives as long as the old key was meant to (a key rotated because it leaked must not
        # turn into one that never expires).
        lifetime = old.expires - old.created if old.expires else 0
        key, record = await keys.create_api_key(self.store.api_keys, old.tenant, old.description,
                                                 old.requests_per_minute, old.tokens_per_minute,
                                                 ttl_s=max(lifetime, 1) if old.expires else 0,
                                                 max_concurrent_requests=old.max_concurrent_requests)
        await keys.revoke_api_key(self.store.api_keys, old.key_id)
        log.info("api key rotated", old_key_id=old.key_id, key_id=record.key_id)
        return tenants_pb2.RotateApiKeyResponse(api_key=record, key=key)

    async def GetUsage(self, request, context):
        tenant = await self._tenant(request.tenant)
        start = _day("start_day", request.start_day, usage.today())
        end = _day("end_day", request.end_day, start)
        if end < start or (end - start).days >= MAX_USAGE_DAYS:
            raise invalid_argument(f"end_day must be from start_day to {MAX_USAGE_DAYS - 1} days after it")
        days = [start + datetime.timedelta(days=i) for i in range((end - start).days + 1)]
        rows = []
        for day, key_id, version, c in await usage.read(self.redis, tenant.name, days):
            rows.append(tenants_pb2.UsageRow(
                day=day, key_id=key_id, model_version=version, requests=c.get("requests", 0),
                prompt_tokens=c.get("prompt_tokens", 0), completion_tokens=c.get("completion_tokens", 0),
                cached_tokens=c.get("cached_tokens", 0), cache_hits=c.get("cache_hits", 0),
                cost_usd=c.get("cost_micro_usd", 0) / usage.MICRO))
        spend = await self.redis.get(usage.spend_key(tenant.name, usage.period_name(tenant.budget_period)))
        return tenants_pb2.GetUsageResponse(rows=rows, total_cost_usd=sum(r.cost_usd for r in rows),
                                            period_spend_usd=int(spend or 0) / usage.MICRO)


def tenant_service_name() -> str:
    return tenants_pb2.DESCRIPTOR.services_by_name["TenantService"].full_name
