"""pools.cloud, pools.cost_per_hour: where a pool is and what a replica there costs (placement prefers cheap)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 11:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pools') as batch:
        batch.add_column(sa.Column('cloud', sa.String(length=63), nullable=False, server_default=''))
        batch.add_column(sa.Column('cost_per_hour', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('pools') as batch:
        batch.drop_column('cost_per_hour')
        batch.drop_column('cloud')
