"""HydraServe's state in PostgreSQL: the ORM models, sessions and Alembic migrations.

Import the submodules you need (`libs.common.db.models`, `.session`, `.migrate`); this package
itself imports nothing, so the SQLAlchemy-free `enums` module stays cheap for the scheduler's
pure policy and the simulator.
"""
