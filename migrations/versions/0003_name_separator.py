"""names: tenant ids and aliases may not contain "--" (service/names.py)

Versions are served as <tenant>--<alias>--v<N> and per-tenant policy files are
<tenant>--<alias>.yaml, so a separator inside a name lets two tenants' names meet. The check is
added NOT VALID: rows that exist keep working under their names (renaming them would orphan their
vLLM names and policy files), and every new row is refused. `flywheel` lists any old offenders
at migration time so an operator can move them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 20:20:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    old = bind.execute(sa.text(
        "SELECT 'tenant ' || id FROM tenants WHERE position('--' in id) > 0 UNION ALL "
        "SELECT 'alias ' || tenant_id || '/' || alias FROM adapters "
        "WHERE position('--' in alias) > 0")).scalars().all()
    for name in old:
        print(f"warning: {name} contains '--'; it keeps working, new names may not")
    op.execute("ALTER TABLE tenants ADD CONSTRAINT ck_tenants_no_separator "
               "CHECK (position('--' in id) = 0) NOT VALID")
    op.execute("ALTER TABLE adapters ADD CONSTRAINT ck_adapters_alias_no_separator "
               "CHECK (position('--' in alias) = 0) NOT VALID")


def downgrade() -> None:
    op.execute("ALTER TABLE adapters DROP CONSTRAINT ck_adapters_alias_no_separator")
    op.execute("ALTER TABLE tenants DROP CONSTRAINT ck_tenants_no_separator")
