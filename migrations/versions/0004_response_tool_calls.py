"""interactions: the answer's tool calls (response_tool_calls)

An answer that calls tools has its calls here (OpenAI's `tool_calls` list), so the dataset can
train on them; NULL for a text answer and for rows stored before this revision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 23:55:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("interactions",
                  sa.Column("response_tool_calls", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("interactions", "response_tool_calls")
