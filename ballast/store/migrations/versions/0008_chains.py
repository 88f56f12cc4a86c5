"""chain_versions and chain_environments: a chain deployed, promoted and rolled back as a unit

Revision ID: 0008
Revises: 0004
Create Date: 2026-12-02 05:20:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'chain_versions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('chain', sa.String(length=63), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('fingerprint', sa.String(length=64), nullable=False),
        sa.Column('entry', sa.String(length=63), nullable=False),
        sa.Column('steps', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('created_by', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('chain', 'number'),
        sa.UniqueConstraint('chain', 'fingerprint'),
    )
    op.create_index('ix_chain_versions_chain', 'chain_versions', ['chain'])
    op.create_table(
        'chain_environments',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('chain', sa.String(length=63), nullable=False),
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('previous_version', sa.Integer(), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('chain', 'name'),
    )
    op.create_index('ix_chain_environments_chain', 'chain_environments', ['chain'])


def downgrade() -> None:
    op.drop_table('chain_environments')
    op.drop_table('chain_versions')
