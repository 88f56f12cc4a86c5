"""finetune_jobs, finetune_events, finetune_checkpoints, trained_adapters: fine-tuning jobs and what they wrote

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 10:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'finetune_jobs',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('key_id', sa.String(length=32), nullable=False),
        sa.Column('model', sa.String(length=63), nullable=False),
        sa.Column('base_version', sa.Integer(), nullable=False),
        sa.Column('method', sa.String(length=16), nullable=False),
        sa.Column('hyperparameters', sa.JSON(), nullable=False),
        sa.Column('training_file', sa.String(length=80), nullable=False),
        sa.Column('validation_file', sa.String(length=80), nullable=True),
        sa.Column('suffix', sa.String(length=64), nullable=True),
        sa.Column('seed', sa.Integer(), nullable=False),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('ballast', sa.JSON(), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('fine_tuned_model', sa.String(length=160), nullable=True),
        sa.Column('adapter_name', sa.String(length=63), nullable=False),
        sa.Column('trained_tokens', sa.BigInteger(), nullable=True),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('total_steps', sa.Integer(), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('estimated_finish', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('pid', sa.Integer(), nullable=True),
        sa.Column('pid_start', sa.String(length=32), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('progress_offset', sa.BigInteger(), nullable=False),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_finetune_jobs_key_id', 'finetune_jobs', ['key_id'])
    op.create_index('ix_finetune_jobs_status', 'finetune_jobs', ['status'])
    op.create_table(
        'finetune_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('level', sa.String(length=8), nullable=False),
        sa.Column('type', sa.String(length=16), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_finetune_events_job', 'finetune_events', ['job_id', 'id'])
    op.create_table(
        'finetune_checkpoints',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('loss', sa.Float(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_finetune_checkpoints_job', 'finetune_checkpoints', ['job_id', 'step'])
    op.create_table(
        'trained_adapters',
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('deployment', sa.String(length=63), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_index('ix_trained_adapters_job_id', 'trained_adapters', ['job_id'])


def downgrade() -> None:
    op.drop_table('trained_adapters')
    op.drop_table('finetune_checkpoints')
    op.drop_table('finetune_events')
    op.drop_table('finetune_jobs')
