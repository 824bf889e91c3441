"""the AI judge: feedback.source, judge_sweeps

`feedback.source` tells a human rating ("human": posted or imported) from one the AI judge gave
("judge"); existing rows are human. Adding a column with a constant default rewrites nothing
(Postgres 11+). `judge_sweeps` records each pass of the judge: what it sent, rated and skipped
(with reasons); the hourly budget is read from it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 04:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('feedback', sa.Column('source', sa.String(length=16),
                                        server_default='human', nullable=False))
    op.create_index('ix_feedback_judge', 'feedback', ['adapter_id', 'interaction_id'],
                    unique=False, postgresql_where=sa.text("source = 'judge'"))
    op.create_table(
        'judge_sweeps',
        sa.Column('id', sa.UUID(), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('adapter_id', sa.UUID(), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('attempted', sa.Integer(), nullable=False),
        sa.Column('rated', sa.Integer(), nullable=False),
        sa.Column('up', sa.Integer(), nullable=False),
        sa.Column('down', sa.Integer(), nullable=False),
        sa.Column('calibration', sa.Integer(), nullable=False),
        sa.Column('skipped', sa.Integer(), nullable=False),
        sa.Column('skipped_reasons', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('stopped', sa.Text(), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'],
                                name=op.f('fk_judge_sweeps_adapter_id_adapters'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'],
                                name=op.f('fk_judge_sweeps_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_judge_sweeps')),
    )
    op.create_index('ix_judge_sweeps_adapter_started', 'judge_sweeps',
                    ['adapter_id', 'started_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_judge_sweeps_adapter_started', table_name='judge_sweeps')
    op.drop_table('judge_sweeps')
    op.drop_index('ix_feedback_judge', table_name='feedback',
                  postgresql_where=sa.text("source = 'judge'"))
    op.drop_column('feedback', 'source')
