"""dataset_records: captured (redacted) request/response pairs, feedback and imported examples

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 06:40:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'dataset_records',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('dataset', sa.String(length=63), nullable=False),
        sa.Column('request_id', sa.String(length=64), nullable=True),
        sa.Column('key_id', sa.String(length=32), nullable=True),
        sa.Column('deployment', sa.String(length=63), nullable=True),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('messages', sa.JSON(), nullable=False),
        sa.Column('completion', sa.JSON(), nullable=True),
        sa.Column('rating', sa.JSON(), nullable=True),
        sa.Column('correction', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('request_id'),
    )
    op.create_index('ix_dataset_records_dataset', 'dataset_records', ['dataset', 'id'])
    op.create_index('ix_dataset_records_expires_at', 'dataset_records', ['expires_at'])


def downgrade() -> None:
    op.drop_table('dataset_records')
