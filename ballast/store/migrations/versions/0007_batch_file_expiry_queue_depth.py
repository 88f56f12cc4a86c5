"""batch_files.expires_at: files of the Batch API are deleted after a retention period (OpenAI's expires_at);
an index for a deployment's queued depth, read on every async submission

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-02 05:35:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batch_files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_batch_files_expires_at', ['expires_at'])
    op.create_index('ix_async_requests_depth', 'async_requests', ['deployment', 'status'])


def downgrade() -> None:
    op.drop_index('ix_async_requests_depth', table_name='async_requests')
    with op.batch_alter_table('batch_files', schema=None) as batch_op:
        batch_op.drop_index('ix_batch_files_expires_at')
        batch_op.drop_column('expires_at')
