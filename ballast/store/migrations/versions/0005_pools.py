"""pools: capacity pools (local process sets, Ray clusters) and their failover state

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 05:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'pools',
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('address', sa.Text(), nullable=True),
        sa.Column('region', sa.String(length=63), nullable=False),
        sa.Column('labels', sa.JSON(), nullable=False),
        sa.Column('max_replicas', sa.Integer(), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('healthy', sa.Boolean(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('pools')
