"""Configuration: every problem named by its key path; `check-config` prints them all."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import tomllib
from functools import partial
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.config import ConfigError, load_config, parse_config

from .helpers import config_dict

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "proxy"]


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def valid(tmp_path: Path) -> dict[str, object]:
    return config_dict("http://127.0.0.1:1/v1", tmp_path / "cred.json")


def test_valid_configuration_loads_typed_values(tmp_path: Path) -> None:
    config = parse_config(valid(tmp_path))
    assert config.server.port == 18080
    assert config.callers[0].organizations == ("acme",)
    assert config.upstream.strict_schema is False
    assert config.cache.not_found_ttl_s == 30.0


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("cache", {"max_bytes": "big"}, "cache.max_bytes: expected an integer"),
        ("cache", {"max_bytez": 1}, "cache.max_bytez: unknown key"),
        ("server", {"port": 70000}, "server.port: must be at most 65535"),
        ("server", {"port": -1}, "server.port: must be at least 0"),
        ("server", {"admin_port": 18080}, "server.admin_port: must differ from server.port"),
        ("upstream", {"strict_schema": "yes"}, "upstream.strict_schema: expected a boolean"),
        (
            "upstream",
            {"base_url": "ftp://x"},
            "upstream.base_url: expected an http:// or https:// URL",
        ),
        (
            "credential",
            {"source": "s3"},
            "credential.source: expected one of 'vault', 'file', 'env'",
        ),
        ("logging", {"format": "xml"}, "logging.format: expected one of 'json', 'console'"),
        ("admin", {"key_sha256": ["abc"]}, "admin.key_sha256[0]: expected 64 lowercase hex digits"),
    ],
)
def test_each_bad_value_is_named_by_its_path(
    tmp_path: Path, section: str, values: dict[str, object], expected: str
) -> None:
    data = valid(tmp_path)
    data[section] = {**data.get(section, {}), **values}  # type: ignore[dict-item]
    assert any(p.startswith(expected) for p in problems(data)), problems(data)


def test_unknown_top_level_section(tmp_path: Path) -> None:
    assert "servers: unknown key" in problems({**valid(tmp_path), "servers": {}})


def test_caller_problems_name_the_caller_index(tmp_path: Path) -> None:
    data = valid(tmp_path)
    data["callers"] = [
        {"name": "a", "key_sha256": ["0" * 63], "organizations": []},
        {"key_sha256": [], "organizations": ["bad org"]},
    ]
    found = problems(data)
    assert "callers[0].key_sha256[0]: expected 64 lowercase hex digits (a SHA-256 digest)" in found
    assert "callers[0].organizations: must list at least one organization (or '*')" in found
    assert "callers[1].name: is required" in found
    assert (
        "callers[1].key_sha256: the caller has no way to authenticate: list a digest, "
        "a jwt_subjects or a certificate_uris entry"
    ) in found
    assert "callers[1].organizations[0]: expected '*' or 1 to 64 of A-Z a-z 0-9 _ -" in found


def test_vault_source_requires_its_settings(tmp_path: Path) -> None:
    data = valid(tmp_path)
    data["credential"] = {"source": "vault", "vault": {"auth": "approle"}}
    found = problems(data)
    assert "credential.vault.address: is required" in found
    assert "credential.vault.role_id: is required when auth = 'approle'" in found
    assert "credential.vault.secret_id_file: is required when auth = 'approle'" in found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = valid(tmp_path)
    data["server"] = {"port": "x", "admin_port": -1, "colour": "blue"}
    data["cache"] = {"max_bytes": 1.5}
    assert len(problems(data)) == 4


def test_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server\nport = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )


def test_check_config_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nport = "8080"\n[cache]\nmax_bytes = "lots"\nsize = 3\n'
        '[[callers]]\nname = "x"\nkey_sha256 = ["nothex"]\norganizations = []\n'
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    for expected in (
        "server.port: expected an integer",
        "cache.max_bytes: expected an integer",
        "cache.size: unknown key",
        "callers[0].key_sha256[0]: expected 64 lowercase hex digits",
        "callers[0].organizations: must list at least one organization",
        "credential.vault.address: is required",
        "7 problem(s) found",
    ):
        assert expected in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_config_accepts_the_shipped_examples() -> None:
    for name in ("example.toml", "demo.toml"):
        result = run_cli("check-config", "--config", str(ROOT / "config" / name))
        assert result.returncode == 0, result.stdout
        assert "OK" in result.stdout


# Keys whose value in config/example.toml is an example, not the default.
EXAMPLE_VALUES = {
    "server.tls.cert_file",
    "server.tls.key_file",
    "credential.vault.address",
    "credential.vault.role",
    "admin.key_sha256",
    "shared.redis_url",
    "shared.password_file",
}


def example_document() -> dict[str, Any]:
    """config/example.toml with its commented-out tables ([server.tls], [shared], the
    certificate caller) switched on."""
    text = (ROOT / "config" / "example.toml").read_text()
    for header in ("# [server.tls]", "# [shared]", "# [[callers]]"):
        head, _, tail = text.partition(header)
        lines = tail.splitlines()
        first = header[2:] + lines.pop(0)
        switched = [first]
        while lines and lines[0].startswith("# ") and " = " in lines[0]:
            switched.append(lines.pop(0)[2:])
        text = head + "\n".join([*switched, *lines]) + "\n"
    return tomllib.loads(text)


def test_example_lists_every_key_with_its_default() -> None:
    """config/example.toml names every key of the dataclasses, and no other, with its
    default (but for a few example values): a key added later must be documented there."""
    from proxy.config import CallerConfig, Config, IssuerConfig, SharedConfig, TlsConfig

    document = example_document()

    def compare(cls: type, table: dict[str, Any], path: str) -> None:
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(table) == names, (path, set(table) ^ names)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            key = f"{path}.{f.name}".lstrip(".")
            if dataclasses.is_dataclass(kind):
                compare(kind, table[f.name], key)  # type: ignore[arg-type]
            elif key not in ("callers", "issuers", "shared", "server.tls", *EXAMPLE_VALUES):
                value = table[f.name]
                assert (tuple(value) if isinstance(value, list) else value) == f.default, key

    compare(Config, document, "")
    compare(SharedConfig, document["shared"], "shared")
    compare(TlsConfig, document["server"]["tls"], "server.tls")
    (issuer,) = document["issuers"]
    assert set(issuer) == {f.name for f in dataclasses.fields(IssuerConfig)}
    caller_keys = {k for caller in document["callers"] for k in caller}
    assert caller_keys == {f.name for f in dataclasses.fields(CallerConfig)}


def test_check_config_reads_the_environment_variable() -> None:
    import os

    env = {**os.environ, "INVOICE_PROXY_CONFIG": str(ROOT / "config" / "example.toml")}
    assert run_cli("check-config", env=env).returncode == 0


def test_check_config_on_a_missing_file() -> None:
    result = run_cli("check-config", "--config", "/nonexistent/x.toml")
    assert result.returncode == 1
    assert "no such file" in result.stdout


def test_new_caller_key_prints_a_key_and_its_digest_line() -> None:
    import hashlib

    first = run_cli("new-caller-key")
    second = run_cli("new-caller-key")
    assert first.returncode == 0
    key, line = first.stdout.splitlines()
    assert len(key) >= 43 and key != second.stdout.splitlines()[0]
    match = re.fullmatch(r'key_sha256 = \["([0-9a-f]{64})"\]', line)
    assert match and match.group(1) == hashlib.sha256(key.encode()).hexdigest()


def test_serve_with_a_bad_file_exits_1_naming_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[cache]\nmax_bytes = true\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 1
    assert "cache.max_bytes: expected an integer" in result.stderr


# --- every number finite and in range ------------------------------------------------

SHARED = {"redis_url": "redis://127.0.0.1:6379/0"}


def _number_keys() -> list[tuple[str | int, ...]]:
    """Every float key of the configuration, found by walking the dataclasses: a key added
    later is checked without a change here."""
    from proxy.config import CallerConfig, Config, SharedConfig

    hints_of = partial(
        get_type_hints, localns={"SharedConfig": SharedConfig, "CallerConfig": CallerConfig}
    )
    keys: list[tuple[str | int, ...]] = []

    def walk(cls: type, prefix: tuple[str | int, ...]) -> None:
        hints = hints_of(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if kind is float:
                keys.append((*prefix, f.name))
            elif dataclasses.is_dataclass(kind):
                walk(kind, (*prefix, f.name))  # type: ignore[arg-type]

    walk(Config, ())
    walk(CallerConfig, ("callers", 0))
    walk(SharedConfig, ("shared",))
    return keys


NUMBER_KEYS = _number_keys()


def key_path(key: tuple[str | int, ...]) -> str:
    return ".".join(str(k) for k in key).replace(".0.", "[0].")


def with_value(tmp_path: Path, key: tuple[str | int, ...], value: object) -> dict[str, Any]:
    data: dict[str, Any] = {**valid(tmp_path), "shared": dict(SHARED)}
    data = json.loads(json.dumps(data))  # a deep copy
    node: Any = data
    for part in key[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[key[-1]] = value
    return data


def test_the_walk_finds_the_number_keys_of_every_section() -> None:
    paths = {key_path(k) for k in NUMBER_KEYS}
    for expected in (
        "server.shutdown_grace_s",
        "upstream.rate_per_s",
        "upstream.fleet_rate_per_minute",
        "credential.file.poll_interval_s",
        "credential.vault.refresh_interval_s",
        "cache.stale_if_error_s",
        "callers[0].rate_per_s",
        "shared.timeout_s",
        "shared.lock_ttl_s",
    ):
        assert expected in paths
    assert len(paths) == len(NUMBER_KEYS) >= 20


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", NUMBER_KEYS, ids=key_path)
def test_every_number_key_refuses_nan_and_infinity_by_its_path(
    tmp_path: Path, key: tuple[str | int, ...], value: float
) -> None:
    assert problems(with_value(tmp_path, key, value)) == [
        f"{key_path(key)}: expected a finite number"
    ]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(NUMBER_KEYS), value=st.floats() | st.integers())
def test_any_number_is_either_taken_as_it_is_or_named_by_its_path(
    tmp_path: Path, key: tuple[str | int, ...], value: float
) -> None:
    try:
        config = parse_config(with_value(tmp_path, key, value))
    except ConfigError as exc:
        # Named by its path, or by a rule between keys that names it (lock_ttl_s).
        assert exc.problems and all(key_path(key) in p for p in exc.problems), exc.problems
        return
    node: Any = config
    for part in key:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    assert math.isfinite(node) and node == value


def write_toml(tmp_path: Path, extra: str) -> Path:
    """A valid configuration file with `extra` TOML lines appended."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[credential]\nsource = "env"\n'
        f'[[callers]]\nname = "a"\nkey_sha256 = ["{"0" * 64}"]\norganizations = ["*"]\n' + extra
    )
    return path


def test_check_config_names_each_non_finite_number_by_its_path(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        "rate_per_s = nan\n"  # belongs to the [[callers]] table above
        '[upstream]\nbase_url = "https://api.planetscale.com/v1?x=1"\n'
        "rate_per_s = nan\ndeadline_s = inf\n"
        '[shared]\nredis_url = "redis://127.0.0.1:6379/0"\ntimeout_s = -inf\n',
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}: upstream.deadline_s: expected a finite number",
        f"{path}: upstream.rate_per_s: expected a finite number",
        f"{path}: upstream.base_url: must not have a query (?...)",
        f"{path}: callers[0].rate_per_s: expected a finite number",
        f"{path}: shared.timeout_s: expected a finite number",
        "5 problem(s) found",
    ]


# --- URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.planetscale.com/v1?x=1", "must not have a query (?...)"),
        ("https://api.planetscale.com/v1?", "must not have a query (?...)"),
        ("https://api.planetscale.com/v1#top", "must not have a fragment (#...)"),
        ("https://user:hunter2@api.planetscale.com/v1", "must not hold userinfo (user:password@)"),
        ("https://api.planetscale.com /v1", "must not contain whitespace or control characters"),
        ("https://api.planetscale.com/v1\n", "must not contain whitespace or control characters"),
        ("https://api.planetscale.com\t/v1", "must not contain whitespace or control characters"),
        ("https://api.planetscale.com:99999/v1", "the port must be a number from 1 to 65535"),
        ("https://api.planetscale.com:0/v1", "the port must be a number from 1 to 65535"),
        ("https://api.planetscale.com:http/v1", "the port must be a number from 1 to 65535"),
        ("https://api.planetscale.com:/v1", "the port must be a number from 1 to 65535"),
        ("https://[::1/v1", "expected an http:// or https:// URL (it does not parse)"),
        ("https://[::1]x/v1", "the host is not a valid IPv6 address"),
        ("https:///v1", "expected an http:// or https:// URL"),
        ("https:api.planetscale.com/v1", "expected an http:// or https:// URL"),
        ("https://api.plänetscale.com/v1", "must be ASCII"),
        ("https://api.planetscale.com/v1/a%zz", "the path holds a character a URL may not"),
        ("https://api_planetscale!com/v1", "the host must be a DNS name or an IP address"),
    ],
)
def test_base_url_problems_are_named_without_echoing_the_url(
    tmp_path: Path, url: str, expected: str
) -> None:
    data = valid(tmp_path)
    data["upstream"] = {"base_url": url}
    found = [p for p in problems(data) if p.startswith("upstream.base_url: ")]
    assert len(found) == 1 and found[0].startswith(f"upstream.base_url: {expected}"), found
    assert "hunter2" not in found[0]


@pytest.mark.parametrize(
    "url",
    [
        "https://vault.internal:8200?x",
        "https://root:s3cret@vault.internal:8200",
        "https://vault.internal:82000",
        "https://vault internal:8200",
        "https://vault.internal:8200#x",
    ],
)
def test_vault_address_is_checked_the_same_way(tmp_path: Path, url: str) -> None:
    data = valid(tmp_path)
    data["credential"] = {"source": "vault", "vault": {"address": url, "auth": "token"}}
    found = problems(data)
    assert len(found) == 1 and found[0].startswith("credential.vault.address: "), found
    assert "s3cret" not in found[0]


@pytest.mark.parametrize(
    "url",
    [
        "https://api.planetscale.com/v1",
        "http://127.0.0.1:8080",
        "http://[::1]:8080/v1/",
        "HTTPS://h/a%20b",
    ],
)
def test_plain_urls_are_accepted(tmp_path: Path, url: str) -> None:
    data = valid(tmp_path)
    data["upstream"] = {"base_url": url}
    data["credential"] = {"source": "vault", "vault": {"address": url, "auth": "token"}}
    config = parse_config(data)
    assert config.upstream.base_url == url.rstrip("/")


url_parts = st.sampled_from(
    ["http", "https", "ftp", "", ":", "//", "/", "@", "u:p@", "?", "#", "[", "]", "::1", "%",
     "%41", " ", "\t", "\n", "\x00", "é", "h", "host.internal", "8080", "99999", "v1", ".."]
)  # fmt: skip


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(url=st.one_of(st.text(max_size=60), st.lists(url_parts, max_size=10).map("".join)))
def test_an_accepted_base_url_is_one_the_upstream_client_can_use(tmp_path: Path, url: str) -> None:
    """Whatever the string: a problem named by its path, or an http(s) URL with a host,
    no userinfo, query or fragment, that yarl takes as the upstream client builds it."""
    data = valid(tmp_path)
    data["upstream"] = {"base_url": url}
    try:
        config = parse_config(data)
    except ConfigError as exc:
        assert [p for p in exc.problems if not p.startswith("upstream.base_url: ")] == []
        return
    built = URL(config.upstream.base_url + "/organizations/acme/invoices/x", encoded=True)
    assert built.scheme in ("http", "https") and built.host
    assert built.user is None and built.password is None
    assert not built.query_string and not built.fragment
    assert not any(c.isspace() for c in str(built))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://[::1/0", "expected a redis:// or rediss:// (TLS) URL (it does not parse)"),
        ("redis://redis.internal:99999/0", "the port must be a number from 1 to 65535"),
        ("redis://redis.internal:6379/0 ", "must not contain whitespace or control characters"),
        ("redis://redis.internal:6379/0#x", "must not have a fragment (#...)"),
    ],
)
def test_shared_redis_url_is_checked_like_the_others(
    tmp_path: Path, url: str, expected: str
) -> None:
    data = {**valid(tmp_path), "shared": {"redis_url": url}}
    assert problems(data) == [f"shared.redis_url: {expected}"]


# --- files that are not a configuration ----------------------------------------------

NOT_A_CONFIG = {
    "not_utf8": (
        b'[server]\nhost = "caf\xe9"\n',
        "not UTF-8 (invalid byte at line 2, column 12); TOML files are UTF-8",
    ),
    "binary": (b"\xff\xfe\x00\x01\x80secret\x00", "not UTF-8 (invalid byte at line 1, column 1)"),
    "not_toml": (
        b"[server\nport = ",
        "not valid TOML (Expected ']' at the end of a table declaration (at line 1, column 8))",
    ),
    "json": (
        b'{"server": {"port": 1}}',
        "not valid TOML (Invalid statement (at line 1, column 1))",
    ),
    "nested": (b"a = " + b"[" * 50_000 + b"]" * 50_000, "not valid TOML (nested too deeply)"),
    "directory": (b"", "is a directory, not a file"),
}


def not_a_config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "config.toml"
    if name == "directory":
        path.mkdir()
    else:
        path.write_bytes(NOT_A_CONFIG[name][0])
    return path


@pytest.mark.parametrize("name", NOT_A_CONFIG)
def test_check_config_says_in_one_line_why_a_file_is_not_a_configuration(
    tmp_path: Path, name: str
) -> None:
    path = not_a_config(tmp_path, name)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: {NOT_A_CONFIG[name][1]}"), lines
    assert result.stderr == ""
    assert "secret" not in result.stdout


@pytest.mark.parametrize("name", ["not_utf8", "not_toml"])
def test_serve_says_in_one_line_why_a_file_is_not_a_configuration(
    tmp_path: Path, name: str
) -> None:
    path = not_a_config(tmp_path, name)
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{path}: {NOT_A_CONFIG[name][1]}"]
    assert result.stdout == ""


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stdout
