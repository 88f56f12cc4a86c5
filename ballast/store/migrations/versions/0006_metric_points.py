"""metric_points: the platform's own metrics history (10 s for a day, 5 min for 30 days)

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-02 05:20:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'metric_points',
        sa.Column('deployment', sa.String(length=63), nullable=False),
        sa.Column('resolution', sa.Integer(), nullable=False),
        sa.Column('ts', sa.Integer(), nullable=False),
        sa.Column('values', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('deployment', 'resolution', 'ts'),
    )


def downgrade() -> None:
    op.drop_table('metric_points')
