"""The staff groups see contributors' records (issue 20): "viewer" looks, "operator" also edits
a record's name, reputation and notes. README, "Operate"."""

from django.db import migrations

VIEWER = [("nodes", "view_contributor"), ("nodes", "view_contributormodel")]
OPERATOR = VIEWER + [("nodes", "change_contributor")]


def add_permissions(apps, schema_editor):
    # As routing/migrations/0005: permissions of new models exist only after post_migrate, so
    # they are made here first.
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    fill_groups(apps)


def fill_groups(apps):
    """Add these permissions to the groups (made by routing/migrations/0005); tests call this
    after a flush."""
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
    for name, wanted in (("viewer", VIEWER), ("operator", OPERATOR)):
        group = Group.objects.filter(name=name).first()
        if group is None:
            continue
        for app_label, codename in wanted:
            group.permissions.remove(
                *Permission.objects.filter(content_type__app_label=app_label, codename=codename)
            )


class Migration(migrations.Migration):
    dependencies = [
        ("nodes", "0008_contributors"),
        ("routing", "0005_ops_staff_groups"),
    ]

    operations = [migrations.RunPython(add_permissions, remove_permissions)]
