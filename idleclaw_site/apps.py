"""The project itself as an app: its system checks and the guard on its private files."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created

from idleclaw_site import local_files


def _private_sqlite_files(sender: Any, connection: Any, **kwargs: Any) -> None:
    # SQLite creates a new database with the umask's mode and gives its -wal and -shm files the
    # database's mode. The database named in the settings is created 0600 before it is first
    # opened (local_files.repair_at_start); this catches one created later, a test database or
    # one deleted and made again, before its -wal and -shm exist (idleclaw_site/local_files.py).
    if connection.vendor == "sqlite":
        local_files.secure_sqlite_files(connection.settings_dict["NAME"])


class SiteConfig(AppConfig):
    name = "idleclaw_site"
    verbose_name = "IdleClaw router"

    def ready(self) -> None:
        from idleclaw_site import https  # noqa: F401  (registers the system checks)

        connection_created.connect(_private_sqlite_files, dispatch_uid="idleclaw-private-files")
        local_files.log_repairs()
