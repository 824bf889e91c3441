"""training_runs.trainer_job: the reference of the training job a run submitted

The worker trains through a trainer backend (workers/trainer/): the job's reference (backend,
where its files are, which process, which attempt) is stored on the run, so a restarted worker
re-attaches to a training that is still running instead of starting it again. NULL until the
train stage submits; nullable column, so nothing is rewritten.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 12:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('training_runs', sa.Column('trainer_job', postgresql.JSONB(astext_type=sa.Text()),
                                             nullable=True))


def downgrade() -> None:
    op.drop_column('training_runs', 'trainer_job')
