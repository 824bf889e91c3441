"""feedback imports: interactions rated elsewhere (Open WebUI, Langfuse, JSONL)

`feedback_imports` holds one row per import job with its counts and reported records.
Interactions get `source` (NULL for those the gateway served), the record's id at the source
(`source_id`) and the import that brought them (`import_id`). The unique index on
(tenant_id, source, source_id) makes importing the same record twice a no-op; it is partial, so
the gateway's inserts (source NULL) write no index entry at all.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 10:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'feedback_imports',
        sa.Column('id', sa.UUID(), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('adapter_id', sa.UUID(), nullable=False),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('requested_by', sa.String(length=200), nullable=False),
        sa.Column('file_name', sa.Text(), nullable=True),
        sa.Column('file_sha256', sa.String(length=64), nullable=True),
        sa.Column('file_bytes', sa.BigInteger(), nullable=True),
        sa.Column('options', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('imported', sa.Integer(), nullable=False),
        sa.Column('skipped', sa.Integer(), nullable=False),
        sa.Column('errors', sa.Integer(), nullable=False),
        sa.Column('skipped_reasons', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('error_samples', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('run_id', sa.UUID(), nullable=True),
        sa.Column('failure_reason', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_feedback_imports_adapter_id_adapters'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], name=op.f('fk_feedback_imports_run_id_training_runs'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_feedback_imports_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback_imports')),
    )
    op.create_index('ix_feedback_imports_adapter_created', 'feedback_imports',
                    ['adapter_id', 'created_at'], unique=False)
    op.add_column('interactions', sa.Column('source', sa.String(length=32), nullable=True))
    op.add_column('interactions', sa.Column('source_id', sa.String(length=300), nullable=True))
    op.add_column('interactions', sa.Column('import_id', sa.UUID(), nullable=True))
    op.create_foreign_key(op.f('fk_interactions_import_id_feedback_imports'), 'interactions',
                          'feedback_imports', ['import_id'], ['id'], ondelete='SET NULL')
    op.create_index('uq_interactions_source', 'interactions', ['tenant_id', 'source', 'source_id'],
                    unique=True, postgresql_where=sa.text('source IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('uq_interactions_source', table_name='interactions',
                  postgresql_where=sa.text('source IS NOT NULL'))
    op.drop_constraint(op.f('fk_interactions_import_id_feedback_imports'), 'interactions',
                       type_='foreignkey')
    op.drop_column('interactions', 'import_id')
    op.drop_column('interactions', 'source_id')
    op.drop_column('interactions', 'source')
    op.drop_index('ix_feedback_imports_adapter_created', table_name='feedback_imports')
    op.drop_table('feedback_imports')
