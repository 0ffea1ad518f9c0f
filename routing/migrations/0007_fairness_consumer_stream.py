"""Issue 20: concurrent requests are counted per consumer (``ConsumerStream.consumer``), and the
admin's staff groups get consumer keys: "viewer" sees them, "operator" also issues and revokes
them (README, "Fair queues and priority")."""

from django.db import migrations, models

VIEWER = [("routing", "view_consumerkey")]
OPERATOR = VIEWER + [("routing", "add_consumerkey"), ("routing", "change_consumerkey")]


def add_permissions(apps, schema_editor):
    # As in 0005: on a fresh database the permissions do not exist yet (post_migrate makes
    # them), so they are made here first.
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    fill_groups(apps)


def fill_groups(apps):
    """Add the consumer-key permissions to the groups (tests call this after a flush)."""
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, wanted in (("viewer", VIEWER), ("operator", OPERATOR)):
        group, _ = Group.objects.get_or_create(name=name)
        for app_label, codename in wanted:
            group.permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )


def remove_permissions(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    shown = Permission.objects.filter(
        content_type__app_label="routing", codename__in=[code for _, code in OPERATOR]
    )
    for group in Group.objects.filter(name__in=["viewer", "operator"]):
        group.permissions.remove(*shown)


class Migration(migrations.Migration):
    dependencies = [
        ("routing", "0006_fair_queue_consumer_keys"),
        ("routing", "0005_ops_staff_groups"),
    ]

    operations = [
        migrations.AddField(
            model_name="consumerstream",
            name="consumer",
            field=models.CharField(
                blank=True, db_default="", db_index=True, default="", max_length=80
            ),
        ),
        migrations.RunPython(add_permissions, remove_permissions),
    ]
