from __future__ import annotations

from django.urls import path

from routing import views

urlpatterns = [
    path("api/chat", views.chat, name="chat"),
    path("health", views.health, name="health"),
    path("api/models", views.models, name="models"),
]
