"""Settings for the IdleClaw router.

Everything comes from the environment. With nothing set, the router runs embedded: one daphne
process, SQLite and the in-memory channel layer. ``DATABASE_URL`` and ``REDIS_URL`` switch to
PostgreSQL and Redis for many workers.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from idleclaw_site import local_files

BASE_DIR = Path(__file__).resolve().parent.parent
LOCAL_DIR = Path(os.environ.get("IDLECLAW_LOCAL_DIR", BASE_DIR / ".local"))


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {value!r}")


def envint(name: str, default: int, *, minimum: int = 0) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def envfloat(name: str, default: float, *, minimum: float = 0.0) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def envlist(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def envorigins(name: str, default: list[str]) -> list[str]:
    """Web origins (``scheme://host[:port]``, no path), or ``["*"]`` for any."""
    origins = [origin.lower() for origin in envlist(name, default)]
    if "*" in origins:
        if len(origins) > 1:
            raise ImproperlyConfigured(f"{name}: * (any origin) cannot be listed with others")
        return origins
    for origin in origins:
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+", origin):
            raise ImproperlyConfigured(
                f"{name}: {origin!r} is not an origin such as https://app.example.com "
                "(scheme://host[:port], no path)"
            )
    return origins


def envrate(name: str, default: str) -> str:
    """A django-ratelimit rate such as ``20/m``."""
    value = os.environ.get(name) or default
    if not re.fullmatch(r"\d+/\d*[smhd]", value):
        raise ImproperlyConfigured(f"{name} must look like 20/m (count/period), got {value!r}")
    return value


def _local_secret_key() -> str:
    """A key generated once per checkout and kept, so sessions survive restarts."""
    return local_files.read_secret_key(LOCAL_DIR)


DEBUG = envbool("IDLECLAW_DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY") or _local_secret_key()
ALLOWED_HOSTS = envlist("IDLECLAW_ALLOWED_HOSTS", ["*"])
CSRF_TRUSTED_ORIGINS = envlist("IDLECLAW_CSRF_TRUSTED_ORIGINS", [])
# Served over HTTPS: by a TLS-terminating proxy listed in IDLECLAW_TRUSTED_PROXIES (only its
# X-Forwarded-Proto is believed: idleclaw_site/https.py), or by daphne's own TLS endpoint. Only
# the admin passes this middleware; the APIs set no cookies.
IDLECLAW_HTTPS = envbool("IDLECLAW_HTTPS", False)
if IDLECLAW_HTTPS:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # The proxy should redirect port 80 itself; this catches an admin page that still arrives
    # over plain HTTP (via the proxy, which says so, or straight at daphne).
    SECURE_SSL_REDIRECT = envbool("IDLECLAW_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = envint("IDLECLAW_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("IDLECLAW_HSTS_INCLUDE_SUBDOMAINS", True)
    # Off unless asked: with `preload` in the header anyone may submit the domain to the
    # browsers' preload lists, which is slow to undo. Django warns (security.W021) whenever it
    # is off; that is the operator's decision, so the warning is silenced until they make it.
    SECURE_HSTS_PRELOAD = envbool("IDLECLAW_HSTS_PRELOAD", False)
    if not SECURE_HSTS_PRELOAD:
        SILENCED_SYSTEM_CHECKS = ["security.W021"]

INSTALLED_APPS = [
    "daphne",
    # django.contrib.admin, with the network's overview on its index page (issue 17)
    "idleclaw_site.admin_site.OperatorAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "nodes",
    "routing",
    "webchat",
    "idleclaw_site",
]

MIDDLEWARE = [
    "idleclaw_site.https.forwarded_proto_from_trusted_proxies",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "idleclaw_site.urls"
ASGI_APPLICATION = "idleclaw_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: SQLite embedded, PostgreSQL with DATABASE_URL -------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    try:
        DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    except Exception as exc:  # dj-database-url raises several types for a bad URL
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("IDLECLAW_SQLITE_PATH", str(LOCAL_DIR / "db.sqlite3")),
            # Writes from the thread pool and the management commands wait instead of failing.
            # WAL with synchronous=NORMAL: readers never wait for the writer, and a commit does
            # not wait for the disk (what is lost in a power cut is live state anyway).
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A file, not SQLite's shared in-memory database: that one fails with "table is
            # locked" instead of waiting when the router's thread and a test touch it at once.
            "TEST": {"NAME": str(LOCAL_DIR / f"test-{os.getpid()}.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# The local folder and the database files readable by their owner only, repaired now if not.
local_files.repair_at_start(LOCAL_DIR, None if DATABASE_URL else DATABASES["default"]["NAME"])
# Threads that run the router's ORM work (idleclaw_site/db.py); SQLite always uses one.
IDLECLAW_DB_THREADS = envint("IDLECLAW_DB_THREADS", 4, minimum=1)

# --- Channel layer and cache: in memory embedded, Redis with REDIS_URL --------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured("REDIS_URL must start with redis://, rediss:// or unix://")

# Every chunk of an answer is one channel-layer message from the node's worker to the
# consumer's, so the layer is tuned for token streams rather than chat-room defaults.
#
# Capacity. channels-redis keeps all messages for one worker process in a single Redis sorted
# set (every node socket and every stream on that worker share it: process-local "specific"
# channels), and refuses a send once the set holds ``capacity`` undelivered messages; the node
# side then cancels that request ("stream was not read fast enough"). The same number bounds
# each channel's buffer inside the receiving process, where an overflow silently drops the
# oldest chunk. The default of 100 is far too small: a 2,000-token answer sent with no pause
# between tokens piled up 200 to 400 undelivered messages for the consumer's worker on a busy
# 2-core machine, six such answers at once up to 850. 5000 absorbs bursts from many fast streams
# while still bounding a worker's backlog to a few seconds of its receive rate and about 1 MB of
# Redis memory; a worker further behind than that is overloaded, and failing the streams it
# cannot keep up with is better than growing the lag without limit.
CHANNEL_CAPACITY = envint("IDLECLAW_CHANNEL_CAPACITY", 5000, minimum=100)
# Expiry. Undelivered messages older than this are pruned at the next send to the same worker,
# judged by the senders' clocks, and a worker's set disappears this long after its last
# message. A live worker drains its set within moments, so what expires is mostly mail for
# streams that already ended or workers that died; 120 s (the default whole-answer limit,
# IDLECLAW_RESPONSE_TIMEOUT) is far beyond any backlog a live request can survive, and
# tolerates clocks of different hosts being seconds apart. The default of 60 s would also do,
# but leaves less room for skew.
CHANNEL_EXPIRY = envint("IDLECLAW_CHANNEL_EXPIRY", 120, minimum=10)
# Probe an idle Redis connection after 10 s, every 5 s, and give up after 3 unanswered probes:
# a silently dead link fails within about 25 s instead of the kernel's default two hours.
REDIS_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis, with a send of one round trip instead of four.
            "BACKEND": "idleclaw_site.layers.RedisChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        # No read or write timeout. redis-py 8 times reads out after 5 s by
                        # default, exactly as long as channels-redis blocks in BZPOPMIN, so every
                        # channel quiet for 5 s raised TimeoutError and closed its node's socket
                        # (redis/redis-py#4091). Any timeout is worse on Python 3.11: redis-py
                        # then sends through asyncio.wait_for, which swallows a cancellation that
                        # lands as the send completes (CPython gh-86296, fixed in 3.12), so a
                        # consumer's hang-up or a stall timeout was lost and the node generated
                        # on for nobody. A dead connection is found by TCP keepalive instead.
                        "socket_timeout": None,
                        "socket_connect_timeout": 5,
                        "socket_keepalive": True,
                        "socket_keepalive_options": REDIS_KEEPALIVE,
                    }
                ],
                "capacity": CHANNEL_CAPACITY,
                "expiry": CHANNEL_EXPIRY,
                "prefix": "idleclaw",
            },
        }
    }
    # Shared by all workers: the per-IP registration rate limits count across the network.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # One pool per process, not one per request (idleclaw_site/cache.py).
            "OPTIONS": {"pool_class": "idleclaw_site.cache.SharedConnectionPool"},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            # channels' in-memory layer, minus its per-message copying and scanning.
            "BACKEND": "idleclaw_site.layers.InProcessChannelLayer",
            "CONFIG": {"capacity": CHANNEL_CAPACITY, "expiry": CHANNEL_EXPIRY},
        }
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# How many router processes the operator runs; only used to catch a single-process setup
# (SQLite, in-memory layer) deployed as many.
IDLECLAW_WORKERS = envint("IDLECLAW_WORKERS", 1, minimum=1)

# --- The network's rules ---------------------------------------------------------------------
IDLECLAW_VERSION = "0.1.0"
# Node liveness (PROTOCOL §1): heartbeats every 15 s, a node silent for 45 s is gone.
IDLECLAW_HEARTBEAT_INTERVAL = envint("IDLECLAW_HEARTBEAT_INTERVAL", 15, minimum=1)
IDLECLAW_NODE_TIMEOUT = envint("IDLECLAW_NODE_TIMEOUT", 45, minimum=2)
IDLECLAW_REGISTRATION_TIMEOUT = envfloat("IDLECLAW_REGISTRATION_TIMEOUT", 10.0, minimum=0.1)
IDLECLAW_MAX_NODES_PER_IP = envint("IDLECLAW_MAX_NODES_PER_IP", 3, minimum=1)
# Per client address, on the shared cache (django-ratelimit).
IDLECLAW_RATE_NODE_REGISTER = envrate("IDLECLAW_RATE_NODE_REGISTER", "5/m")
IDLECLAW_RATE_CHAT = envrate("IDLECLAW_RATE_CHAT", "20/m")
IDLECLAW_RATE_DEFAULT = envrate("IDLECLAW_RATE_DEFAULT", "60/m")
IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = envint("IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP", 3, minimum=1)
# An anonymous consumer on IPv6 is its address's network of this prefix length, not the single
# address: one host commonly holds a whole /64, and each address would be a consumer of its own.
IDLECLAW_IPV6_CONSUMER_PREFIX = envint("IDLECLAW_IPV6_CONSUMER_PREFIX", 64, minimum=1)
if IDLECLAW_IPV6_CONSUMER_PREFIX > 128:
    raise ImproperlyConfigured("IDLECLAW_IPV6_CONSUMER_PREFIX must be at most 128")
# Priority for contributors (issue 20, README "Fair queues and priority"): a request with a
# contributor's token gets one step of priority per this many tokens its nodes served in the last
# 24 hours (at least 1 for any), up to the maximum; its chat rate and concurrent-request limit are
# the anonymous ones times (1 + priority / 2).
IDLECLAW_PRIORITY_TOKENS = envint("IDLECLAW_PRIORITY_TOKENS", 2000, minimum=1)
IDLECLAW_PRIORITY_MAX = envint("IDLECLAW_PRIORITY_MAX", 10, minimum=0)
# Reverse proxies whose X-Forwarded-For is believed (comma-separated CIDRs); none by default.
IDLECLAW_TRUSTED_PROXIES = envlist("IDLECLAW_TRUSTED_PROXIES", [])
for _cidr in IDLECLAW_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_cidr, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"IDLECLAW_TRUSTED_PROXIES: {_cidr!r} is not an IP network"
        ) from None
# HTTP intake under daphne (idleclaw_site/http_guard.py): a connection must send a whole request
# head within this many seconds of opening (or of its last response, when kept alive); one
# address may hold this many connections still waiting for a head or body (trusted proxies are
# exempt); and waiting connections never take the last this-many descriptors of the process
# (at most half), which stay free for requests being answered and node sockets.
IDLECLAW_HTTP_HEAD_TIMEOUT = envfloat("IDLECLAW_HTTP_HEAD_TIMEOUT", 10.0, minimum=0.1)
# ...and then its whole body within this many seconds of the head (else a 408); until then it
# still counts against its address and the descriptors. 30 s lets the largest body the API
# reads (1 MB) arrive at 34 KB/s, a poor mobile uplink.
IDLECLAW_HTTP_BODY_TIMEOUT = envfloat("IDLECLAW_HTTP_BODY_TIMEOUT", 30.0, minimum=0.1)
IDLECLAW_MAX_PENDING_CONNECTIONS_PER_IP = envint(
    "IDLECLAW_MAX_PENDING_CONNECTIONS_PER_IP", 64, minimum=1
)
IDLECLAW_RESERVED_DESCRIPTORS = envint("IDLECLAW_RESERVED_DESCRIPTORS", 1024, minimum=0)
# Frames a node may send per second (sustained; bursts of two seconds' worth): a small budget of
# its own (heartbeats, model updates) plus one for each request it is serving, and each new
# request adds a burst of two seconds of its budget at once. The network's nodes send one frame
# per token: a node streaming 500 tokens/s on each of ten slots sends 5,000 frames a second, and
# a fast model's burst of a few thousand tokens fits the burst a request brings.
IDLECLAW_NODE_MAX_FRAMES_PER_S = envint("IDLECLAW_NODE_MAX_FRAMES_PER_S", 100, minimum=1)
IDLECLAW_NODE_FRAMES_PER_S_PER_REQUEST = envint(
    "IDLECLAW_NODE_FRAMES_PER_S_PER_REQUEST", 2000, minimum=0
)
# Among equally loaded nodes, send a request to one whose Ollama has the model loaded (reported
# with its heartbeats): the others would load it first, seconds before the first token. Off only
# to measure what it saves (bench/RESULTS.md, issue 19).
IDLECLAW_PREFER_LOADED_NODES = envbool("IDLECLAW_PREFER_LOADED_NODES", True)
# Frames about requests a node was never sent (or malformed chunks) before it is disconnected.
IDLECLAW_NODE_MAX_STRIKES = envint("IDLECLAW_NODE_MAX_STRIKES", 20, minimum=1)
# Longest silence from a node while a consumer waits for its next chunk.
IDLECLAW_STALL_TIMEOUT = envfloat("IDLECLAW_STALL_TIMEOUT", 60.0, minimum=0.1)
# Whole-answer limit.
IDLECLAW_RESPONSE_TIMEOUT = envfloat("IDLECLAW_RESPONSE_TIMEOUT", 120.0, minimum=0.1)
# On SIGTERM: how long streams in flight may take to finish before they are ended with an error
# event (idleclaw_site/shutdown.py). A process manager must wait longer than this before it
# kills the router (systemd's TimeoutStopSec, docs/deploy.md).
IDLECLAW_SHUTDOWN_GRACE = envfloat("IDLECLAW_SHUTDOWN_GRACE", 30.0, minimum=0.0)
# Roles the OpenAI- and Ollama-compatible APIs accept (the network's /api/chat keeps to user and
# assistant). An operator may narrow this, e.g. to "user,assistant,system".
IDLECLAW_COMPAT_ROLES = tuple(
    envlist("IDLECLAW_COMPAT_ROLES", ["system", "user", "assistant", "tool"])
)
if not set(IDLECLAW_COMPAT_ROLES) <= {"system", "user", "assistant", "tool"} or not (
    {"user"} <= set(IDLECLAW_COMPAT_ROLES)
):
    raise ImproperlyConfigured(
        "IDLECLAW_COMPAT_ROLES must include user and name only system, user, assistant, tool"
    )
# Server-side tools (issue 15, routing/tools/): web_search, run by the router through a SearXNG
# instance's JSON API. Unset, no tool exists and every request is relayed exactly as before.
IDLECLAW_SEARXNG_URL = os.environ.get("IDLECLAW_SEARXNG_URL", "").strip().rstrip("/")
# Off switches: all of the router's tools, or just for the models named (comma-separated).
IDLECLAW_SERVER_TOOLS = envbool("IDLECLAW_SERVER_TOOLS", True)
IDLECLAW_SERVER_TOOLS_OFF_MODELS = frozenset(envlist("IDLECLAW_SERVER_TOOLS_OFF_MODELS", []))
# Tool calls a node's requests may have the router run per minute (across all workers).
IDLECLAW_TOOL_CALLS_PER_MINUTE = envint("IDLECLAW_TOOL_CALLS_PER_MINUTE", 20, minimum=1)
# Seconds one call of the router's own tools may take (the network's rule: 15); never past the
# response deadline.
IDLECLAW_TOOL_TIMEOUT = envfloat("IDLECLAW_TOOL_TIMEOUT", 15.0, minimum=0.1)
# The operator's own system prompt, put first in every request on every API; empty for none.
IDLECLAW_SYSTEM_PROMPT = os.environ.get("IDLECLAW_SYSTEM_PROMPT", "")
# The Ollama version the /ollama API reports to clients.
IDLECLAW_OLLAMA_VERSION = os.environ.get("IDLECLAW_OLLAMA_VERSION", "0.12.3")
# Queue (per model, first in first out across workers) when every node's slots are taken.
IDLECLAW_QUEUE_TIMEOUT = envfloat("IDLECLAW_QUEUE_TIMEOUT", 30.0, minimum=0.0)
IDLECLAW_MAX_QUEUE = envint("IDLECLAW_MAX_QUEUE", 100, minimum=0)
# How often a waiting stream gets a `: queued position=N` line. A request that waits less than
# this is answered with its first token or a plain 503; one that waits longer has its stream
# opened, so it ends with an error event instead of a 503.
IDLECLAW_QUEUE_NOTICE_INTERVAL = envfloat("IDLECLAW_QUEUE_NOTICE_INTERVAL", 3.0, minimum=0.1)
# Failover: attempts on different nodes before the first token.
IDLECLAW_MAX_ATTEMPTS = envint("IDLECLAW_MAX_ATTEMPTS", 3, minimum=1)
# Answers are cut (finish_reason "length") at this many characters of content and reasoning.
IDLECLAW_MAX_RESPONSE_CHARS = envint("IDLECLAW_MAX_RESPONSE_CHARS", 16_000, minimum=1)
# A node failing 3 times in a row is not routed to for this long, then gets one trial request.
IDLECLAW_NODE_COOLDOWN = envfloat("IDLECLAW_NODE_COOLDOWN", 30.0, minimum=0.0)
# Reputation (0 to 1, neutral 0.5; README "Reputation and probes"): a node below the floor gets
# no consumer traffic until it passes probes again (`manage.py probe_nodes`); reputation decays
# toward 0.5 with this half-life.
IDLECLAW_REPUTATION_FLOOR = envfloat("IDLECLAW_REPUTATION_FLOOR", 0.25, minimum=0.0)
if IDLECLAW_REPUTATION_FLOOR > 1:
    raise ImproperlyConfigured("IDLECLAW_REPUTATION_FLOOR must be at most 1")
IDLECLAW_REPUTATION_HALF_LIFE_HOURS = envfloat(
    "IDLECLAW_REPUTATION_HALF_LIFE_HOURS", 24.0, minimum=0.01
)
# Probes a node passes within this many seconds after a failed round earn it nothing: with
# several probers each judging other models, a pass on one model must not offset a failure on
# another. Keep it longer than the probers' interval (--every).
IDLECLAW_REPUTATION_FAIL_HOLD = envfloat("IDLECLAW_REPUTATION_FAIL_HOLD", 3600.0, minimum=0.0)
# probe_nodes sends a model's probe to its nodes one after another, in random order, each after
# a random pause; the pauses of one model add up to at most this (seconds; --stagger).
IDLECLAW_PROBE_STAGGER = envfloat("IDLECLAW_PROBE_STAGGER", 10.0, minimum=0.0)
# Retry-After for a 503 when no node serves the model.
IDLECLAW_RETRY_AFTER = envint("IDLECLAW_RETRY_AFTER", 10, minimum=1)
# Embeddings (/v1/embeddings, /ollama/api/embed): most inputs in one request (a node takes at
# most 256, docs/node-protocol-extensions.md), and most characters in all of them. The default
# is a little under the chat limit of 100,000 so that a request fits the 100,000-byte frame it
# travels to its node in; longer text is refused with a 400 that names the limit.
IDLECLAW_EMBED_MAX_INPUTS = envint("IDLECLAW_EMBED_MAX_INPUTS", 256, minimum=1)
if IDLECLAW_EMBED_MAX_INPUTS > 256:
    raise ImproperlyConfigured("IDLECLAW_EMBED_MAX_INPUTS must be at most 256 (a node's limit)")
IDLECLAW_EMBED_MAX_CHARS = envint("IDLECLAW_EMBED_MAX_CHARS", 90_000, minimum=1)

# --- Browsers on other sites (CORS) -------------------------------------------------------
# Web pages that may call the public APIs (/v1, /ollama, /api, /health) from a browser:
# "*" for any, a comma-separated list of origins, or empty for none. "*" is safe here: the APIs
# read no cookies and take no credentials, so a page gets nothing a script on any server could
# not. django-cors-headers serves it inside the API handler (idleclaw_site/asgi.py); the admin
# and the chat pages never get these headers.
IDLECLAW_CORS_ORIGINS = envorigins("IDLECLAW_CORS_ORIGINS", ["*"])
CORS_ALLOW_ALL_ORIGINS = IDLECLAW_CORS_ORIGINS == ["*"]
CORS_ALLOWED_ORIGINS = [] if CORS_ALLOW_ALL_ORIGINS else IDLECLAW_CORS_ORIGINS
CORS_ALLOW_CREDENTIALS = False  # never: there is nothing to be credentialed for
CORS_URLS_REGEX = r"^/(?:v1|ollama|api)(?:/|$)|^/health$"
CORS_ALLOW_METHODS = ("GET", "HEAD", "POST", "OPTIONS")
# Headers a page may send. "*" allows any but Authorization, which must be named (Fetch
# standard); the named ones are what the official openai and ollama JavaScript clients send, for
# browsers older than "*" (2020).
CORS_ALLOW_HEADERS = (
    "*",
    "accept",
    "authorization",
    "content-type",
    "user-agent",
    "x-requested-with",
    "openai-organization",
    "openai-project",
    "x-stainless-arch",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
)
# Response headers a page may read besides the always-readable ones.
CORS_EXPOSE_HEADERS = ("retry-after", "x-request-id")
# The Bearer token Prometheus presents at GET /metrics (issue 17). Unset: /metrics answers 404.
# Compared in constant time; at least 16 characters, so that guessing it is hopeless.
IDLECLAW_METRICS_TOKEN = os.environ.get("IDLECLAW_METRICS_TOKEN", "").strip()
if IDLECLAW_METRICS_TOKEN and len(IDLECLAW_METRICS_TOKEN) < 16:
    raise ImproperlyConfigured("IDLECLAW_METRICS_TOKEN must be at least 16 characters")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = LOCAL_DIR / "static"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "idleclaw": {
            "handlers": ["console"],
            "level": os.environ.get("IDLECLAW_LOG_LEVEL", "INFO"),
            "propagate": False,
        },
    },
}

# Router workers refresh a liveness row every IDLECLAW_WORKER_BEAT seconds; one silent for
# IDLECLAW_WORKER_TIMEOUT is dead, and survivors remove its nodes and end its streams.
IDLECLAW_WORKER_BEAT = envfloat("IDLECLAW_WORKER_BEAT", 5.0, minimum=0.1)
IDLECLAW_WORKER_TIMEOUT = envint("IDLECLAW_WORKER_TIMEOUT", 30, minimum=1)
