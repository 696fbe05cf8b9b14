"""Tenant limits (requests/tokens per minute, concurrency) and private models.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 22:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIMITS = ("max_requests_per_minute", "max_tokens_per_minute", "max_concurrent_requests")


def upgrade() -> None:
    for column in _LIMITS:
        op.add_column("tenants", sa.Column(column, sa.Integer(), nullable=True))
        op.create_check_constraint(op.f(f"ck_tenants_{column}_positive"), "tenants",
                                   f"{column} > 0")
    op.add_column("models", sa.Column("owner_tenant_id", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_models_owner_tenant_id"), "models", ["owner_tenant_id"],
                    unique=False)
    op.create_foreign_key(op.f("fk_models_owner_tenant_id_tenants"), "models", "tenants",
                          ["owner_tenant_id"], ["id"], ondelete="RESTRICT")


def downgrade() -> None:
    op.drop_constraint(op.f("fk_models_owner_tenant_id_tenants"), "models",
                       type_="foreignkey")
    op.drop_index(op.f("ix_models_owner_tenant_id"), table_name="models")
    op.drop_column("models", "owner_tenant_id")
    for column in reversed(_LIMITS):
        op.drop_constraint(op.f(f"ck_tenants_{column}_positive"), "tenants", type_="check")
        op.drop_column("tenants", column)
