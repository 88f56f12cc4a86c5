"""async_requests: the durable queue of async requests and batch lines

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 02:45:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'async_requests',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('deployment', sa.String(length=63), nullable=False),
        sa.Column('target', sa.String(length=140), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('key_id', sa.String(length=32), nullable=False),
        sa.Column('batch_id', sa.String(length=40), nullable=True),
        sa.Column('custom_id', sa.String(length=255), nullable=True),
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('payload', sa.JSON(), nullable=True),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('errors', sa.JSON(), nullable=True),
        sa.Column('version', sa.Integer(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('claimed_by', sa.String(length=40), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('result_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('webhook_endpoint', sa.Text(), nullable=True),
        sa.Column('webhook_id', sa.String(length=40), nullable=True),
        sa.Column('webhook_state', sa.String(length=12), nullable=False),
        sa.Column('webhook_attempts', sa.Integer(), nullable=False),
        sa.Column('webhook_next_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('webhook_error', sa.Text(), nullable=True),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_async_requests_claim', 'async_requests', ['status', 'priority', 'created_at'])
    op.create_index('ix_async_requests_webhook', 'async_requests', ['webhook_state', 'webhook_next_at'])
    op.create_index('ix_async_requests_deployment', 'async_requests', ['deployment'])
    op.create_index('ix_async_requests_key_id', 'async_requests', ['key_id'])
    op.create_index('ix_async_requests_batch_id', 'async_requests', ['batch_id'])


def downgrade() -> None:
    op.drop_table('async_requests')
