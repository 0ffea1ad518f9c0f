"""Reads for the router's tool rounds."""

from __future__ import annotations

from nodes.models import NodeModel


def node_model_capabilities(*, session_id: int, model: str) -> list[str] | None:
    """What the node session reported its copy of ``model`` can do (Ollama's capabilities);
    None when the node has no such model any more."""
    return (
        NodeModel.objects.filter(session_id=session_id, name=model)
        .values_list("capabilities", flat=True)
        .first()
    )
