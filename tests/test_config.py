"""Settings validation and configuration from the environment (no Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from victor_rcache import CacheConfig, ConfigurationError, InvalidTTLError, MultiLevelCache
from victor_rcache.config import DEFAULT_URL, check_ttl


@pytest.mark.parametrize("settings", [
    {"l1_size": 0}, {"l2_size": -1}, {"l3_size": 0}, {"l1_size": True}, {"l2_size": 1.5},
    {"promote_after": 0}, {"max_value_bytes": 0}, {"max_value_bytes": 2**30}, {"shards": 0},
    {"l2_size": 8, "shards": 16}, {"l1_ttl": 0}, {"l2_ttl": -5}, {"l3_ttl": float("nan")},
    {"l1_ttl": 1e12}, {"socket_timeout": 0}, {"codec": object()}, {"clock": 3},
])
def test_invalid_settings_raise_configuration_error(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        CacheConfig(**settings)


def test_size_error_names_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="raise l2_size or lower shards"):
        CacheConfig(l2_size=4)


def test_ttls_may_be_disabled() -> None:
    config = CacheConfig(l1_ttl=None, l2_ttl=None, l3_ttl=None)
    assert (config.l1_ttl, config.l2_ttl, config.l3_ttl) == (None, None, None)


@pytest.mark.parametrize(("ttl", "message"), [
    (0, "positive"), (-1, "positive"), (float("nan"), "positive"), (float("inf"), "ten years"),
    (10**10, "ten years"), ("60", "number"), (True, "number"), (None, "number"),
])
def test_bad_ttls(ttl: Any, message: str) -> None:
    with pytest.raises(InvalidTTLError, match=message):
        check_ttl(ttl)


def test_url_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VICTOR_RCACHE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert CacheConfig().url == DEFAULT_URL
    monkeypatch.setenv("REDIS_URL", "redis://r:1/0")
    assert CacheConfig().url == "redis://r:1/0"
    monkeypatch.setenv("VICTOR_RCACHE_URL", "redis://v:2/0")
    assert CacheConfig().url == "redis://v:2/0"
    assert CacheConfig(redis_url="redis://a:3/0").url == "redis://a:3/0"


def test_from_env_reads_every_kind_of_setting() -> None:
    env = {"VICTOR_RCACHE_URL": "redis://h:1/2", "VICTOR_RCACHE_NAMESPACE": "agents",
           "VICTOR_RCACHE_L2_SIZE": "5000", "VICTOR_RCACHE_L1_TTL": "none", "VICTOR_RCACHE_L2_TTL": "90.5",
           "VICTOR_RCACHE_FAIL_OPEN": "false", "VICTOR_RCACHE_SHARDS": "8"}
    config = CacheConfig.from_env(env, promote_after=5)
    assert (config.url, config.namespace, config.l2_size, config.l1_ttl, config.l2_ttl) == \
        ("redis://h:1/2", "agents", 5000, None, 90.5)
    assert (config.fail_open, config.shards, config.promote_after) == (False, 8, 5)


@pytest.mark.parametrize(("var", "value"), [("L2_SIZE", "lots"), ("FAIL_OPEN", "maybe"), ("L1_TTL", "soon")])
def test_from_env_names_the_bad_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=f"VICTOR_RCACHE_{var}"):
        CacheConfig.from_env({f"VICTOR_RCACHE_{var}": value})


def test_cache_from_env_uses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VICTOR_RCACHE_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("VICTOR_RCACHE_NAMESPACE", "fromenv")
    cache = MultiLevelCache.from_env(l1_size=7)
    assert (cache.namespace, cache.config.l1_size, cache.config.url) == ("fromenv", 7, "redis://127.0.0.1:1/0")
    cache.close()


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis://host:notaport/0"])
def test_malformed_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError, match="redis://"):
        MultiLevelCache(url)


def test_unknown_setting_and_mixed_config_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="l4_size"):
        MultiLevelCache("redis://127.0.0.1:1/0", l4_size=3)
    with pytest.raises(ConfigurationError, match="not both"):
        MultiLevelCache(config=CacheConfig(), l1_size=3)


def test_passwords_never_appear_in_error_messages() -> None:
    with pytest.raises(ConfigurationError) as err:
        MultiLevelCache("http://user:s3cret@host:1/0")
    assert "s3cret" not in str(err.value)
