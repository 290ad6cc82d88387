"""Alembic migrations of the results database, shipped as a package so they work from a wheel.

:func:`worker.db.upgrade_database` finds this directory through the package's ``__file__``; the
``alembic.ini`` at the repository root points here for ``alembic upgrade head`` from a checkout.
"""
