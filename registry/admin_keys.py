"""AdminKeyService: admin keys listed, created (optionally expiring) and revoked (admin plane, in the registry)."""

from __future__ import annotations

from llmserve.admin.v1 import admin_keys_pb2, admin_keys_pb2_grpc
from llmserve.common.errors import failed_precondition, invalid_argument, not_found
from llmserve.common.logs import get_logger
from llmserve.common.state import keys
from llmserve.common.state.store import Store

log = get_logger(__name__)


class AdminKeyServicer(admin_keys_pb2_grpc.AdminKeyServiceServicer):
    def __init__(self, store: Store):
        self.store = store

    async def ListAdminKeys(self, request, context):
        return admin_keys_pb2.ListAdminKeysResponse(admin_keys=await self.store.admin_keys.list())

    async def CreateAdminKey(self, request, context):
        try:
            key, record = await keys.create_admin_key(self.store.admin_keys, request.description,
                                                      request.ttl_seconds)
        except ValueError as exc:
            raise invalid_argument(str(exc)) from None
        log.info("admin key created", key_id=record.key_id, expires=record.expires)
        return admin_keys_pb2.CreateAdminKeyResponse(admin_key=record, key=key)

    async def RevokeAdminKey(self, request, context):
        if not request.key_id:
            raise invalid_argument("key_id is required (\"adm_...\"); ListAdminKeys shows the key ids")
        try:
            record = await keys.revoke_admin_key(self.store.admin_keys, request.key_id)
        except keys.LastAdminKey:
            raise failed_precondition(
                f"{request.key_id} is the only active admin key: revoking it would lock every admin out; create "
                "its successor first (CreateAdminKey, `llmserve admin-key create`), then revoke this one") from None
        if record is None:
            raise not_found(f"admin key {request.key_id!r} does not exist; ListAdminKeys shows the key ids")
        log.info("admin key revoked", key_id=record.key_id)
        return admin_keys_pb2.RevokeAdminKeyResponse(admin_key=record)


def admin_key_service_name() -> str:
    return admin_keys_pb2.DESCRIPTOR.services_by_name["AdminKeyService"].full_name
