"""The operator's admin site (issue 17): Django's, with the network's overview on its index."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest


class OperatorAdminSite(admin.AdminSite):
    """The default admin site (``OperatorAdminConfig``)."""

    site_header = "IdleClaw router"
    site_title = "IdleClaw router"
    index_title = "The network"
    index_template = "admin/idleclaw_index.html"

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        """The index, with the overview (``routing.overview``) read from the database, so it
        shows the same whichever worker serves the page."""
        from routing.overview import network_overview

        context = {**(extra_context or {}), "overview": network_overview()}
        return super().index(request, context)


class OperatorAdminConfig(AdminConfig):
    """Django's admin app (in INSTALLED_APPS), with ``OperatorAdminSite`` as its default site."""

    default_site = "idleclaw_site.admin_site.OperatorAdminSite"
