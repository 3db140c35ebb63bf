"""The example configuration in deploy/ is valid and documents every key the settings know; the multi-node compose
example's nodes validate and share one database and one spool."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from node.config import Settings, load_settings
from tests.conftest import REPO_ROOT, edgenode_cmd, node_env

EXAMPLE = REPO_ROOT / "deploy" / "edgenode.toml"


def test_example_config_is_valid() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.peers[0].ae_title == "PACS"
    result = subprocess.run(
        edgenode_cmd("config", "check", "--config", str(EXAMPLE)),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for section, field in Settings.model_fields.items():
        assert re.search(rf"^\[\[?{section}\]\]?", text, re.M), f"section [{section}] missing"
        sub = field.annotation
        model = getattr(sub, "__args__", (sub,))[0]
        for key in getattr(model, "model_fields", {}):
            assert re.search(rf"^#? ?{key} = ", text, re.M), f"{section}.{key} is not explained in {EXAMPLE.name}"


# ---- deploy/compose.multinode.yaml: two nodes, PostgreSQL and Orthanc -----------------------------------------------

COMPOSE = REPO_ROOT / "deploy" / "compose.multinode.yaml"
COMPOSE_ENV = {"EDGENODE_DB_PASSWORD": "a-test-password"}  # what the operator's deploy/.env holds


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${NAME}, ${NAME:-default}, ${NAME:?error} (and without the colon)."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name) or (name in env and ":" not in op):
            return env[name]
        if op.endswith("-"):
            return arg
        raise KeyError(f"compose needs ${name}: {arg}")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", value, text)


def compose_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(), COMPOSE_ENV))
    return spec


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> what is mounted there (a named volume, or a path relative to deploy/)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def mounted_file(service: dict[str, Any], container_path: str) -> Path:
    source = mounts(service)[container_path]
    assert source.startswith("./"), f"{container_path} should come from a file in deploy/, not {source}"
    path = (COMPOSE.parent / source).resolve()
    assert path.is_file(), path
    return path


def image_env() -> dict[str, str]:
    """The EDGENODE_* variables deploy/Dockerfile sets in the image (a service's environment overrides them)."""
    return dict(re.findall(r"\b(EDGENODE_\w+)=(\S+)", (REPO_ROOT / "deploy" / "Dockerfile").read_text()))


def node_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in spec["services"].items() if s.get("command", [None])[0] == "serve"}


def node_settings(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Path, dict[str, str]]:
    """A node service's settings as its container loads them: its config file, the image's and its environment."""
    command = service["command"]
    config = mounted_file(service, command[command.index("--config") + 1])
    env = {**image_env(), **{k: str(v) for k, v in service.get("environment", {}).items()}}
    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = load_settings(config)
    return settings, config, env


def test_multinode_compose_nodes_validate_and_share_database_and_spool(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = compose_spec()
    nodes = node_services(spec)
    assert len(nodes) >= 2, "the example runs two nodes"
    loaded = {}
    for name, service in nodes.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
        settings, config, env = node_settings(service, monkeypatch)
        loaded[name] = settings
        checked = subprocess.run(
            edgenode_cmd("config", "check", "--config", str(config)),
            env={**node_env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, (name, checked.stderr)
        assert "database postgresql+psycopg://edgenode:***@postgres:5432/edgenode" in checked.stdout, checked.stdout

    # One database: the compose file's PostgreSQL, with the user, password and database it creates.
    (url,) = {s.database_url for s in loaded.values()}
    parsed = make_url(url)
    db_service = spec["services"][str(parsed.host)]
    assert db_service["image"].startswith("postgres:")
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.username, parsed.password, parsed.database) == (
        db_service["environment"]["POSTGRES_USER"],
        db_service["environment"]["POSTGRES_PASSWORD"],
        db_service["environment"]["POSTGRES_DB"],
    )
    extras = re.search(r'pip install [^\n]*"\.\[([^\]]*)\]"', (REPO_ROOT / "deploy" / "Dockerfile").read_text())
    assert extras is not None and "postgres" in extras.group(1).split(","), "the image needs the postgres extra"

    # One spool: the same named volume at the configured spool_dir of every node; a data folder of its own each.
    (spool_dir,) = {str(s.spool_dir) for s in loaded.values()}
    spools = {mounts(nodes[n])[spool_dir] for n in nodes}
    assert len(spools) == 1 and spools <= set(spec["volumes"]), spools
    data = [mounts(nodes[n])[str(s.data_dir)] for n, s in loaded.items()]
    assert len(set(data)) == len(nodes) and set(data) <= set(spec["volumes"]) and not set(data) & spools, data
    assert len({nodes[n].get("hostname", n) for n in nodes}) == len(nodes)  # identities differ

    # Orthanc: routes to every node (as the shipped script names them) and receives their results.
    orthanc = spec["services"]["orthanc"]
    pacs = json.loads(mounted_file(orthanc, orthanc["command"][0]).read_text())
    routed = {name: spec_ for name, spec_ in pacs["DicomModalities"].items() if name.startswith("edgenode-")}
    assert sorted(routed.values()) == sorted(
        [s.node.ae_title, nodes[n].get("hostname", n), s.node.port] for n, s in loaded.items()
    )
    assert pacs["EdgenodeFailover"] is True  # only because the spool is shared
    for lua in pacs["LuaScripts"]:
        assert mounted_file(orthanc, lua).read_text() == (REPO_ROOT / "deploy/orthanc/edgenode-routing.lua").read_text()
    for name, settings in loaded.items():
        assert [(p.ae_title, p.host, p.port) for p in settings.peers] == [("PACS", "orthanc", pacs["DicomPort"])], name
        assert settings.node.ae_title and pacs["DicomAet"] == "PACS"


@pytest.mark.parametrize("compose", ["deploy/compose.multinode.yaml", "deploy/triton/compose.yaml"])
def test_compose_files_follow_the_compose_specification(compose: str, tmp_path: Path) -> None:
    """Checked against the Compose Specification's JSON schema (as vendored by check-jsonschema): no Docker daemon
    is needed, where running the file is not possible (CI and this workplace have none)."""

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        args = ["--builtin-schema", "vendor.compose-spec", str(path)]
        return subprocess.run([sys.executable, "-m", "check_jsonschema", *args], capture_output=True, text=True)

    checked = check(REPO_ROOT / compose)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "compose.yaml"  # the check itself refuses what Compose would: a service with a typo'd key
    spec = yaml.safe_load((REPO_ROOT / compose).read_text())
    next(iter(spec["services"].values()))["enviroment"] = {"A": "1"}
    broken.write_text(yaml.safe_dump(spec))
    assert check(broken).returncode != 0
