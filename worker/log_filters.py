"""Log filters for warnings that are wrong for waferwatch's setup and would only alarm a reader."""

from __future__ import annotations

import logging

__all__ = ["quiet_hostless_transport_warning"]


class _NoHostnameFilter(logging.Filter):
    """Drops kombu's "No hostname was supplied. Reverting to default 'localhost'"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No hostname was supplied")


_FILTER = _NoHostnameFilter()


def quiet_hostless_transport_warning() -> None:
    """Silence kombu's hostname warning, for brokers that have no host (the embedded filesystem broker).

    kombu warns whenever a URL carries no hostname, even for ``filesystem://``, which never connects to a
    host; the warning appeared in every ``demo`` and twice in ``status``. Call it only for such brokers, so
    a Redis URL that really lacks its host still warns. Idempotent.
    """
    logger = logging.getLogger("kombu.connection")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
