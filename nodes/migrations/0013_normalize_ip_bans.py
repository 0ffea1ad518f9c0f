"""Issue 20, red team 4: IP bans in the spelling nodes' addresses are stored in
(``idleclaw_site.net.normalized``), so that a ban written ``2001:DB8::1`` or
``::ffff:192.0.2.9`` matches the node it was meant for."""

import ipaddress

from django.db import migrations


def _normalized(value):
    # The rule of idleclaw_site.net.normalized as it is today, frozen here: a migration must
    # not change with the code.
    try:
        ip = ipaddress.ip_address(value.partition("%")[0])
    except ValueError:
        return value
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in ipaddress.IPv6Network("64:ff9b::/96"):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return str(ip)


def normalize_bans(apps, schema_editor):
    NodeBan = apps.get_model("nodes", "NodeBan")
    for ban in NodeBan.objects.filter(kind="ip"):
        value = _normalized(ban.value)
        if value != ban.value:
            NodeBan.objects.filter(pk=ban.pk).update(value=value)


class Migration(migrations.Migration):
    dependencies = [("nodes", "0012_failed_probe_at")]

    operations = [migrations.RunPython(normalize_bans, migrations.RunPython.noop)]
