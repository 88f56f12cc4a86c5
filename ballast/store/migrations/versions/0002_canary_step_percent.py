"""environments.canary_target -> canary_step_percent (the stepwise canary ramp's step)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 13:46:00
"""

from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('environments', schema=None) as batch_op:
        batch_op.alter_column('canary_target', new_column_name='canary_step_percent')


def downgrade() -> None:
    with op.batch_alter_table('environments', schema=None) as batch_op:
        batch_op.alter_column('canary_step_percent', new_column_name='canary_target')
