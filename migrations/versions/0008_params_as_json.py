"""interactions.params as json, not jsonb: the request's parameters kept as the product sent them

jsonb re-orders object keys (shorter keys first) and drops duplicate ones. Chat templates dump
`tools` as JSON text into the prompt, so a tool schema read back from jsonb renders another
prompt at training time than the one the engine served. json keeps the text. Nothing queries
inside params, so no jsonb operator is lost.

Rows stored before this revision keep jsonb's order (the original text is gone). The ALTER
rewrites the table under an exclusive lock: on a large interactions table, run it in a quiet
window.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 16:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column('interactions', 'params', type_=postgresql.JSON(astext_type=sa.Text()),
                    existing_type=postgresql.JSONB(astext_type=sa.Text()),
                    postgresql_using='params::json')


def downgrade() -> None:
    op.alter_column('interactions', 'params', type_=postgresql.JSONB(astext_type=sa.Text()),
                    existing_type=postgresql.JSON(astext_type=sa.Text()),
                    postgresql_using='params::jsonb')
