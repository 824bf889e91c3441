"""Lookups the routes share: 404 when the caller's tenant has no such thing."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from service.api.errors import ApiError
from service.db.adapter_reads import adapter_for_alias
from service.db.models import Adapter


async def adapter_or_404(session: AsyncSession, tenant_id: str, alias: str) -> Adapter:
    """The tenant's adapter with this alias; 404 (alias_not_found) otherwise."""
    adapter = await adapter_for_alias(session, tenant_id, alias)
    if adapter is None:
        raise ApiError(404, f"alias {alias!r} not found", param="alias", code="alias_not_found")
    return adapter
