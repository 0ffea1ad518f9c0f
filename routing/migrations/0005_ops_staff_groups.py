"""The admin's two staff groups (issue 17): "viewer" sees the live network, "operator" also acts
on it (disconnect, drain and ban nodes, cancel requests, edit bans). README, "Operate"."""

from django.db import migrations

# (app label, model) pairs whose rows the admin shows.
SHOWN = [
    ("nodes", "nodesession"),
    ("nodes", "nodemodel"),
    ("nodes", "routerworker"),
    ("nodes", "nodeban"),
    ("routing", "inflightrequest"),
    ("routing", "queuedrequest"),
    ("routing", "consumerstream"),
    ("admin", "logentry"),
]
VIEWER = [(app, f"view_{model}") for app, model in SHOWN]
OPERATOR = VIEWER + [
    ("nodes", "operate_nodesession"),
    ("routing", "cancel_inflightrequest"),
    ("nodes", "add_nodeban"),
    ("nodes", "change_nodeban"),
    ("nodes", "delete_nodeban"),
]


def create_groups(apps, schema_editor):
    # Permissions are made after the last migration (post_migrate); on a fresh database they do
    # not exist yet, so they are made here first (Django's recipe for data migrations that
    # need them).
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    fill_groups(apps)


def fill_groups(apps):
    """Create the groups, or add what they miss; permissions must exist (tests call this after
    a flush, which removes the groups)."""
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, wanted in (("viewer", VIEWER), ("operator", OPERATOR)):
        group, _ = Group.objects.get_or_create(name=name)
        for app_label, codename in wanted:
            group.permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=["viewer", "operator"]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("routing", "0004_ops_metrics"),
        ("nodes", "0007_ops_node_permissions"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("admin", "0003_logentry_add_action_flag_choices"),
    ]

    operations = [migrations.RunPython(create_groups, remove_groups)]
