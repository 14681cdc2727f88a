"""serve/config.yaml is a valid Serve deploy config, and the builder checks its args."""

from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


def test_config_yaml_is_a_valid_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = config.applications
    assert application.import_path == "serve.app:app"
    assert config.http_options.host == "127.0.0.1"
    (deployment,) = application.deployments
    assert deployment.name == "GPT2Server"
    assert deployment.max_ongoing_requests >= application.args["max_batch_size"]


def test_config_args_are_the_builder_args():
    from serve.app import AppArgs

    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    AppArgs.model_validate(args)  # extra="forbid": a typo in config.yaml fails here


def test_builder_names_a_missing_model_dir(tmp_path):
    from serve.app import AppArgs, app

    with pytest.raises(ValueError, match="no config.json"):
        app(AppArgs(model_dir=str(tmp_path / "nope")))
