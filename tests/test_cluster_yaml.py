"""cluster.yaml: a valid Ray cluster launcher config whose GPU workers install this project."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"  # what `ray up` checks against


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


def test_valid_against_rays_schema(config, schema):
    jsonschema.validate(config, schema)


def test_valid_after_rays_own_defaults(config):
    # the same two steps `ray up` runs before it touches the cloud; offline for AWS
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("breakage", ["unknown top-level key", "GPU count as text"])
def test_a_broken_copy_fails(config, schema, breakage):
    broken = copy.deepcopy(config)
    if breakage == "unknown top-level key":
        broken["max_gpu_workers"] = 4
    else:
        broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_gpu_workers_scale_from_zero(config):
    node_types = config["available_node_types"]
    gpu = node_types["gpu_worker"]
    assert gpu["resources"].get("GPU", 0) >= 1
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert "GPU" not in node_types[config["head_node_type"]]["resources"]


def test_nodes_install_this_project_and_the_pinned_ray(config):
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    commands = config["setup_commands"]
    assert f"pip install -e {remote}" in commands
    pinned = re.search(r'"ray\[[^\]]*\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert any(f"]=={pinned}" in c and c.startswith("pip install") for c in commands)
