from __future__ import annotations

from alembic import context

import orchestrator.tables  # noqa: F401  (registers the orchestrator's tables)
from billing.db import make_engine
from billing.tables import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""
assert url, "sqlalchemy.url must be set"


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
