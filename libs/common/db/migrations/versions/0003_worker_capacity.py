"""A worker's reported capacity (the slots scale-out counts).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 07:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("capacity", sa.Integer(), nullable=True))
    op.create_check_constraint(op.f("ck_workers_capacity_positive"), "workers",
                               "capacity > 0")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_workers_capacity_positive"), "workers", type_="check")
    op.drop_column("workers", "capacity")
