"""The deployment check: single-process backends configured for several router workers."""

from __future__ import annotations

import pytest

from nodes.checks import check_single_process_backends

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
REDIS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer"}}
SQLITE = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
POSTGRES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "idleclaw"}}

# The check only reads DATABASES; Django warns that overriding it may confuse open connections.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


@pytest.fixture
def deployed(settings):
    """Production-like settings; each test picks the backends."""
    settings.DEBUG = False
    settings.IDLECLAW_WORKERS = 4
    return settings


def warning_ids() -> list[str]:
    return sorted(message.id for message in check_single_process_backends())


def test_several_workers_on_the_embedded_backends_get_both_warnings(deployed):
    deployed.CHANNEL_LAYERS = IN_MEMORY
    deployed.DATABASES = SQLITE
    messages = check_single_process_backends()
    assert sorted(m.id for m in messages) == ["idleclaw.W001", "idleclaw.W002"]
    hints = " ".join(m.hint for m in messages)
    assert "REDIS_URL" in hints and "DATABASE_URL" in hints


def test_several_workers_on_the_in_memory_layer_alone_are_warned(deployed):
    deployed.CHANNEL_LAYERS = IN_MEMORY
    deployed.DATABASES = POSTGRES
    assert warning_ids() == ["idleclaw.W001"]


def test_several_workers_on_sqlite_alone_are_warned(deployed):
    deployed.CHANNEL_LAYERS = REDIS
    deployed.DATABASES = SQLITE
    assert warning_ids() == ["idleclaw.W002"]


def test_several_workers_on_redis_and_postgresql_pass(deployed):
    deployed.CHANNEL_LAYERS = REDIS
    deployed.DATABASES = POSTGRES
    assert warning_ids() == []


def test_one_worker_may_use_the_embedded_backends(deployed):
    deployed.IDLECLAW_WORKERS = 1
    deployed.CHANNEL_LAYERS = IN_MEMORY
    deployed.DATABASES = SQLITE
    assert warning_ids() == []


def test_debug_mode_is_not_warned(deployed):
    deployed.DEBUG = True
    deployed.CHANNEL_LAYERS = IN_MEMORY
    deployed.DATABASES = SQLITE
    assert warning_ids() == []
