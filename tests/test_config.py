"""Configuration: every problem named by its key path; `check-config` prints them all."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

from .conftest import config_dict

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
    assert "callers[1].key_sha256: must list at least one digest" in found
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
