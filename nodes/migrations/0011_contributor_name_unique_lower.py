"""Contributor names unique without case (red-team F9 of issue 20): a unique index on
``lower(name)``. The router already refused a name another contributor had in any case, but
two registrations at once could both pass that check; records that did are renamed first (the
oldest keeps the name, the others get ``-<id>`` appended), since the index could not be made
over them."""

import django.db.models.functions.text
from django.db import migrations, models


def rename_case_duplicates(apps, schema_editor):
    Contributor = apps.get_model("nodes", "Contributor")
    seen: set[str] = set()
    for contributor in Contributor.objects.order_by("first_seen", "pk").only("pk", "name"):
        lowered = contributor.name.lower()
        if lowered not in seen:
            seen.add(lowered)
            continue
        tries = 0
        while True:
            suffix = f"-{contributor.pk}" + (f"-{tries}" if tries else "")
            name = contributor.name[: 64 - len(suffix)] + suffix
            if name.lower() not in seen:
                break
            tries += 1
        seen.add(name.lower())
        Contributor.objects.filter(pk=contributor.pk).update(name=name)


class Migration(migrations.Migration):
    dependencies = [
        ("nodes", "0010_merge_identity_probes"),
    ]

    operations = [
        migrations.RunPython(rename_case_duplicates, migrations.RunPython.noop, elidable=True),
        migrations.AddConstraint(
            model_name="contributor",
            constraint=models.UniqueConstraint(
                django.db.models.functions.text.Lower("name"), name="unique_contributor_name_lower"
            ),
        ),
    ]
