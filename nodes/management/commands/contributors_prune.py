"""``manage.py contributors_prune``: remove contributors' records not seen for a long time."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nodes.services import CONTRIBUTOR_HOURS_KEPT, contributor_hours_prune, contributors_prune

DEFAULT_DAYS = 180


class Command(BaseCommand):
    help = (
        "Remove the records of contributors not seen for DAYS days (default "
        f"{DEFAULT_DAYS}) that have no live node, with their per-model and per-hour figures. "
        "A contributor whose record was removed starts afresh (a new generated name) the next "
        "time a node proves its key. Also removes every contributor's per-hour token counts "
        f"older than {CONTRIBUTOR_HOURS_KEPT.total_seconds() / 3600:.0f} hours (priority "
        "looks back 24)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=DEFAULT_DAYS, metavar="N")
        parser.add_argument(
            "--dry-run", action="store_true", help="only say how many would be removed"
        )

    def handle(self, *args: Any, days: int, dry_run: bool, **options: Any) -> None:
        if days < 1:
            raise CommandError("--days must be at least 1")
        count = contributors_prune(days=days, dry_run=dry_run)
        hours = contributor_hours_prune(dry_run=dry_run)
        kept = f"{CONTRIBUTOR_HOURS_KEPT.total_seconds() / 3600:.0f} hours"
        done = "would remove" if dry_run else "removed"
        self.stdout.write(f"{done} {count} contributor record(s) not seen for {days} days")
        self.stdout.write(f"{done} {hours} hourly token count(s) older than {kept}")
