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
    # derived from max_batch_size by the builder; a value here would override it
    assert "max_ongoing_requests" not in deployment.model_fields_set


def test_config_args_are_the_builder_args():
    from serve.app import AppArgs

    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    AppArgs.model_validate(args)  # extra="forbid": a typo in config.yaml fails here


def test_max_ongoing_requests_follows_max_batch_size(model_dir):
    from serve.app import AppArgs, app

    for batch, given, expected in [(16, None, 64), (4, None, 16), (4, 3, 3)]:
        built = app(AppArgs(model_dir=str(model_dir), max_batch_size=batch,
                            max_ongoing_requests=given))
        assert built._bound_deployment._deployment_config.max_ongoing_requests == expected


def test_builder_names_a_missing_model_dir(tmp_path):
    from serve.app import AppArgs, app

    with pytest.raises(ValueError, match="no config.json"):
        app(AppArgs(model_dir=str(tmp_path / "nope")))


def test_dtype_is_one_of_gpt2cores():
    from pydantic import ValidationError

    from serve.app import AppArgs

    assert AppArgs(model_dir="m", dtype="int8").dtype == "int8"
    with pytest.raises(ValidationError, match="dtype"):
        AppArgs(model_dir="m", dtype="fp8")
