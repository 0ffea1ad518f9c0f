"""URLs of the web chat page (issue 16)."""

from __future__ import annotations

from django.urls import path

from webchat import views

urlpatterns = [
    path("", views.chat, name="webchat"),
    path("network", views.network, name="webchat-network"),
    path("network.json", views.network_data, name="webchat-network-data"),
    path("assets/<str:version>/<str:name>", views.asset, name="webchat-asset"),
]
