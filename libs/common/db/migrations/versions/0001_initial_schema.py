"""Initial schema: tenants, API keys, models, partitions, nodes, endpoints, workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 19:46:46.492727
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("architecture", sa.String(length=128), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("num_layers", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("kv_cache_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("storage_path", sa.Text(), nullable=False),
        sa.Column("ttft_slo_ms", sa.Integer(), nullable=False),
        sa.Column("tpot_slo_ms", sa.Integer(), nullable=False),
        sa.Column("max_pipeline_degree", sa.Integer(), server_default="4", nullable=False),
        sa.Column("keep_alive_s", sa.Float(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("keep_alive_s >= 0", name=op.f("ck_models_keep_alive_s_not_negative")),
        sa.CheckConstraint(
            "kv_cache_bytes >= 0", name=op.f("ck_models_kv_cache_bytes_not_negative")
        ),
        sa.CheckConstraint(
            "max_pipeline_degree BETWEEN 1 AND 4", name=op.f("ck_models_max_pipeline_degree_range")
        ),
        sa.CheckConstraint("num_layers > 0", name=op.f("ck_models_num_layers_positive")),
        sa.CheckConstraint("size_bytes > 0", name=op.f("ck_models_size_bytes_positive")),
        sa.CheckConstraint(
            "ttft_slo_ms > 0 AND tpot_slo_ms > 0", name=op.f("ck_models_slos_positive")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("gpu_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("nic_bandwidth_bytes_per_s", sa.BigInteger(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "up",
                "down",
                name="node_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("gpu_memory_bytes > 0", name=op.f("ck_nodes_gpu_memory_bytes_positive")),
        sa.CheckConstraint(
            "nic_bandwidth_bytes_per_s > 0", name=op.f("ck_nodes_nic_bandwidth_positive")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "key_hash ~ '^[0-9a-f]{64}$'", name=op.f("ck_api_keys_key_hash_is_sha256")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_api_keys_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"], unique=False)
    op.create_table(
        "endpoints",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "planned",
                "starting",
                "ready",
                "draining",
                "stopped",
                name="endpoint_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("pipeline_degree", sa.Integer(), nullable=False),
        sa.Column("last_request_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "pipeline_degree BETWEEN 1 AND 4", name=op.f("ck_endpoints_pipeline_degree_range")
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_endpoints_model_id_models"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_endpoints")),
    )
    op.create_index(
        op.f("ix_endpoints_model_id_state"), "endpoints", ["model_id", "state"], unique=False
    )
    op.create_table(
        "partitions",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("degree", sa.Integer(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("start_layer", sa.Integer(), nullable=False),
        sa.Column("end_layer", sa.Integer(), nullable=False),
        sa.Column("num_bytes", sa.BigInteger(), nullable=False),
        sa.Column("manifest", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.CheckConstraint("degree BETWEEN 1 AND 4", name=op.f("ck_partitions_degree_range")),
        sa.CheckConstraint("num_bytes > 0", name=op.f("ck_partitions_num_bytes_positive")),
        sa.CheckConstraint(
            "stage >= 0 AND stage < degree", name=op.f("ck_partitions_stage_below_degree")
        ),
        sa.CheckConstraint(
            "start_layer >= 0 AND end_layer > start_layer", name=op.f("ck_partitions_layer_range")
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_partitions_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_partitions")),
        sa.UniqueConstraint(
            "model_id", "degree", "stage", name=op.f("uq_partitions_model_id_degree_stage")
        ),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("endpoint_id", sa.BigInteger(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("start_layer", sa.Integer(), nullable=False),
        sa.Column("end_layer", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("is_full_size", sa.Boolean(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "starting",
                "ready",
                "stopping",
                "stopped",
                name="worker_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("pod_name", sa.String(length=253), nullable=True),
        sa.Column("fetch_bytes", sa.BigInteger(), nullable=True),
        sa.Column("fetch_bandwidth_bytes_per_s", sa.Float(), nullable=True),
        sa.Column("fetch_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "gpu_memory_bytes > 0", name=op.f("ck_workers_gpu_memory_bytes_positive")
        ),
        sa.CheckConstraint("stage >= 0", name=op.f("ck_workers_stage_not_negative")),
        sa.CheckConstraint(
            "start_layer >= 0 AND end_layer > start_layer", name=op.f("ck_workers_layer_range")
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["endpoints.id"],
            name=op.f("fk_workers_endpoint_id_endpoints"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_workers_node_id_nodes"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_endpoint_id"), "workers", ["endpoint_id"], unique=False)
    op.create_index(op.f("ix_workers_node_id_state"), "workers", ["node_id", "state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_node_id_state"), table_name="workers")
    op.drop_index(op.f("ix_workers_endpoint_id"), table_name="workers")
    op.drop_table("workers")
    op.drop_table("partitions")
    op.drop_index(op.f("ix_endpoints_model_id_state"), table_name="endpoints")
    op.drop_table("endpoints")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("nodes")
    op.drop_table("models")
