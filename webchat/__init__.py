"""The consumers' web chat page, served by the router itself (issue 16)."""
