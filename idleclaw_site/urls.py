"""URL map of the router: consumer APIs and the operator's admin."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from routing.limits import admin_login

handler400 = "routing.views.bad_request"
handler404 = "routing.views.not_found"
handler500 = "routing.views.server_error"

urlpatterns = [
    path("admin/login/", admin_login, name="admin-login"),
    path("admin/", admin.site.urls),
    path("", include("routing.urls")),
    path("", include("webchat.urls")),
]
