from __future__ import annotations

from django.urls import include, path, re_path

from routing import exposition, views

# OpenAI-compatible, at /v1 and, as Ollama serves its own OpenAI API beside its native one, at
# /ollama/v1: whatever is added here is served at both.
openai_urlpatterns = [
    path("chat/completions", views.openai_chat_completions, name="openai-chat"),
    path("embeddings", views.openai_embeddings, name="openai-embeddings"),
    path("models", views.openai_models, name="openai-models"),
    re_path(r"^models/(?P<model>.+)$", views.openai_model, name="openai-model"),
]

urlpatterns = [
    # The network's own API (PROTOCOL §2)
    path("api/chat", views.chat, name="chat"),
    path("health", views.health, name="health"),
    # For `manage.py probe_nodes` only: 404 without its token (routing/probes.py)
    path("api/internal/probe", views.internal_probe, name="internal-probe"),
    path("api/models", views.models, name="models"),
    path("api/network/nodes", views.network_nodes, name="network-nodes"),
    # Prometheus, for operators (token-guarded; README "Operate")
    path("metrics", exposition.metrics, name="metrics"),
    path("v1/", include(openai_urlpatterns)),
    # Ollama-compatible
    path("ollama", views.ollama_root),
    path("ollama/", views.ollama_root, name="ollama-root"),
    path("ollama/v1/", include((openai_urlpatterns, "ollama-v1"))),
    path("ollama/api/version", views.ollama_version, name="ollama-version"),
    path("ollama/api/tags", views.ollama_tags, name="ollama-tags"),
    path("ollama/api/ps", views.ollama_ps, name="ollama-ps"),
    path("ollama/api/show", views.ollama_show, name="ollama-show"),
    path("ollama/api/chat", views.ollama_chat, name="ollama-chat"),
    path("ollama/api/generate", views.ollama_generate, name="ollama-generate"),
    path("ollama/api/embed", views.ollama_embed, name="ollama-embed"),
    path("ollama/api/embeddings", views.ollama_embeddings, name="ollama-embeddings"),
    re_path(
        r"^ollama/api/(?:pull|push|create|copy|delete|blobs/.*)$",
        views.ollama_unsupported,
    ),
]
