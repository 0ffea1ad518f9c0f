from __future__ import annotations

from django.urls import path, re_path

from routing import exposition, views

urlpatterns = [
    # The network's own API (PROTOCOL §2)
    path("api/chat", views.chat, name="chat"),
    path("health", views.health, name="health"),
    path("api/models", views.models, name="models"),
    # Prometheus, for operators (token-guarded; README "Operate")
    path("metrics", exposition.metrics, name="metrics"),
    # OpenAI-compatible
    path("v1/chat/completions", views.openai_chat_completions, name="openai-chat"),
    path("v1/models", views.openai_models, name="openai-models"),
    re_path(r"^v1/models/(?P<model>.+)$", views.openai_model, name="openai-model"),
    # Ollama-compatible
    path("ollama", views.ollama_root),
    path("ollama/", views.ollama_root, name="ollama-root"),
    path("ollama/api/version", views.ollama_version, name="ollama-version"),
    path("ollama/api/tags", views.ollama_tags, name="ollama-tags"),
    path("ollama/api/ps", views.ollama_ps, name="ollama-ps"),
    path("ollama/api/show", views.ollama_show, name="ollama-show"),
    path("ollama/api/chat", views.ollama_chat, name="ollama-chat"),
    path("ollama/api/generate", views.ollama_generate, name="ollama-generate"),
    re_path(
        r"^ollama/api/(?:pull|push|create|copy|delete|embed|embeddings|blobs/.*)$",
        views.ollama_unsupported,
    ),
]
