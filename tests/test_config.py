"""Settings: defaults, config file, EPLB_* environment, flags; validation naming the field."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from eplb_service.config import (
    FIELDS,
    ConfigError,
    DeploymentOptions,
    Settings,
    add_arguments,
    env_var,
    from_args,
    load_settings,
    settings_table,
)


def test_defaults():
    s = load_settings(env={})
    assert s == Settings()
    assert (s.host, s.grpc_port, s.http_port) == ("127.0.0.1", 50051, 8080)
    assert s.rebalance_interval_s == 0  # auto-rebalance off by default
    assert s.options_for("any") == DeploymentOptions(expert_bytes=None, num_groups=1)


def test_priority_file_env_flags(tmp_path):
    path = tmp_path / "eplb.json"
    path.write_text(json.dumps({"window_s": 10, "cooldown_s": 5, "grpc_port": 1234}))
    env = {"EPLB_WINDOW_S": "20", "EPLB_GRPC_PORT": "2345", "UNRELATED": "x"}
    s = load_settings(path, env=env, overrides={"window_s": "30", "http_port": None})
    assert s.window_s == 30.0  # flag beats env beats file
    assert s.grpc_port == 2345  # env beats file
    assert s.cooldown_s == 5.0  # file beats default
    assert s.http_port == 8080  # a None override means "not given"


def test_deployment_overrides(tmp_path):
    env = {"EPLB_DEPLOYMENTS": '{"dsv3": {"expert_bytes": 44040192, "num_groups": 8}}',
           "EPLB_EXPERT_BYTES": "100"}
    s = load_settings(env=env)
    assert s.options_for("dsv3") == DeploymentOptions(44040192, 8)
    assert s.options_for("other") == DeploymentOptions(100, 1)
    with pytest.raises(ConfigError, match=r"deployments.*unknown option 'bogus'"):
        load_settings(env={"EPLB_DEPLOYMENTS": '{"a": {"bogus": 1}}'})
    with pytest.raises(ConfigError, match="num_groups must be an integer >= 1"):
        load_settings(env={"EPLB_DEPLOYMENTS": '{"a": {"num_groups": 0}}'})
    with pytest.raises(ConfigError, match=r"deployments.*JSON"):
        load_settings(env={"EPLB_DEPLOYMENTS": "{nope"})


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_toml_file(tmp_path):
    path = tmp_path / "eplb.toml"
    path.write_text('policy = "deepseek"\nmin_gain = 0.2\n[deployments.a]\nnum_groups = 4\n')
    s = load_settings(path, env={})
    assert s.min_gain == 0.2
    assert s.options_for("a").num_groups == 4


@pytest.mark.parametrize(
    ("source", "value", "text"),
    [
        ("env", {"EPLB_WINDOW_S": "-1"},
         "window_s must be > 0, got -1.0 (from environment EPLB_WINDOW_S)"),
        ("env", {"EPLB_GRPC_PORT": "http"},
         "grpc_port (from environment EPLB_GRPC_PORT): expected an integer"),
        ("env", {"EPLB_GRPC_PORT": "70000"}, "grpc_port must be in 0..65535"),
        ("env", {"EPLB_MIN_GAIN": "nan"},
         "min_gain (from environment EPLB_MIN_GAIN): expected a finite number"),
        ("flag", {"policy": "nope"}, "policy must be one of"),
        ("flag", {"log_level": "loud"}, "log_level must be one of debug, info, warning, error"),
        ("flag", {"agreement_period_steps": "0"},
         "agreement_period_steps must be >= 1, got 0 (from flag --agreement-period-steps)"),
        ("flag", {"versions_kept": "1"}, "versions_kept must be >= 2"),
        ("flag", {"rollout_timeout_s": "0"}, "rollout_timeout_s must be > 0"),
        ("flag", {"expert_bytes": "-5"}, "expert_bytes must be none or >= 0"),
        ("flag", {"max_message_bytes": "100"}, "max_message_bytes must be >= 1024"),
        ("flag", {"host": " "}, "host must be a non-empty address"),
    ],
)
def test_validation_names_the_field_and_source(source, value, text):
    with pytest.raises(ConfigError) as err:
        if source == "env":
            load_settings(env=value)
        else:
            load_settings(env={}, overrides=value)
    assert text in str(err.value)


def test_typed_constructor_validates():
    with pytest.raises(ConfigError, match="cooldown_s must be >= 0"):
        Settings(cooldown_s=-1)
    with pytest.raises(ConfigError, match="grpc_port: expected an integer"):
        Settings(grpc_port="x")  # type: ignore[arg-type]
    assert Settings(expert_bytes="none").expert_bytes is None  # type: ignore[arg-type]
    assert Settings().replace(window_s=5).window_s == 5.0


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.json"):
        load_settings(tmp_path / "missing.json", env={})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_settings(bad, env={})
    bad.write_text("[]")
    with pytest.raises(ConfigError, match="expected an object"):
        load_settings(bad, env={})
    bad.write_text('{"window_seconds": 3}')
    with pytest.raises(ConfigError, match="unknown setting 'window_seconds'"):
        load_settings(bad, env={})
    bad.write_text('{"window_s": "long"}')
    with pytest.raises(ConfigError, match=r"window_s \(from config file .*bad\.json'\): expected"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        load_settings(env={}, overrides={"nope": 1})


def test_cli_flags_cover_every_setting():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    for f in FIELDS:
        assert f"--{f.name.replace('_', '-')}" in help_text
        assert env_var(f.name) in help_text.replace("\n", " ").replace("  ", "")
    args = parser.parse_args(["--grpc-port", "0", "--window-s", "7.5", "--expert-bytes", "none"])
    s = from_args(args, env={"EPLB_HTTP_PORT": "9"})
    assert (s.grpc_port, s.http_port, s.window_s, s.expert_bytes) == (0, 9, 7.5, None)


def test_settings_table_lists_every_setting():
    table = settings_table()
    for f in FIELDS:
        assert f"`{f.name}`" in table and f"`{env_var(f.name)}`" in table
