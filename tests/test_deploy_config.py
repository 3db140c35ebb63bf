"""The example configuration in deploy/ is valid and documents every key the settings know."""

from __future__ import annotations

import re
import subprocess

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
