"""The first minutes of a new user: `edgenode serve` with no configuration says why it refuses everyone."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from node.commands.serve import NO_PEERS
from node.local_orthanc import wait_for_port
from tests.conftest import REPO_ROOT, edgenode_cmd, free_port, node_env

pytestmark = pytest.mark.slow  # starts `edgenode serve` processes


def serve_log(tmp_path: Path, **env: str) -> str:
    """Run `edgenode serve` (no --config) until its listener answers, stop it with SIGTERM, return its log."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    environment = node_env(
        EDGENODE_NODE__PORT=str(port),
        EDGENODE_NODE__DATA_DIR=str(tmp_path / "var"),
        EDGENODE_NODE__MIN_FREE_DISK_MB="1",
        EDGENODE_WEB__ENABLED="false",
        EDGENODE_INFERENCE__WORKERS="0",
        **env,
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(edgenode_cmd("serve"), stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_for_port("127.0.0.1", port, 90.0, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log_path.read_text()


def test_serve_without_peers_says_which_setting_and_where_the_example_is(tmp_path: Path) -> None:
    text = serve_log(tmp_path)
    lines = [line for line in text.splitlines() if NO_PEERS in line]
    assert len(lines) == 1 and " WARNING " in lines[0], text[-3000:]
    assert "[[peers]]" in NO_PEERS and "deploy/edgenode.toml" in NO_PEERS and "refused" in NO_PEERS
    assert (REPO_ROOT / "deploy" / "edgenode.toml").read_text().count("[[peers]]") >= 1  # the file it names


def test_serve_with_a_peer_does_not_warn(tmp_path: Path) -> None:
    peers = [{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
    text = serve_log(tmp_path, EDGENODE_PEERS=json.dumps(peers))
    assert "(1 peer(s) allowed)" in text and "no [[peers]]" not in text, text[-3000:]
