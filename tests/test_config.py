import dataclasses

import pytest

import run_server
from app.config import RunConfig, update_run_config
from shared.errors import ConfigError


def test_valid_changes_are_coerced():
    cfg = update_run_config(RunConfig(), {"num_rounds": "7", "lr": 0.1, "dataset": "synthetic", "momentum": "0.9"})
    assert (cfg.num_rounds, cfg.lr, cfg.dataset, cfg.momentum) == (7, 0.1, "synthetic", 0.9)


def test_every_bad_field_is_reported_with_what_it_must_be():
    with pytest.raises(ConfigError) as info:
        update_run_config(RunConfig(), {"num_rounds": 0, "lr": "fast", "dataset": "imagenet", "bogus": 1,
                                        "batch_size": 2.5, "momentum": 1.0})
    f = info.value.fields
    assert set(f) == {"num_rounds", "lr", "dataset", "bogus", "batch_size", "momentum"}
    assert "1 to 100000" in f["num_rounds"] and "fashion-mnist" in f["dataset"] and "[0, 1)" in f["momentum"]


def test_cross_field_check():
    with pytest.raises(ConfigError) as info:
        update_run_config(RunConfig(), {"min_fit_clients": 5, "max_fit_clients": 2})
    assert "max_fit_clients" in info.value.fields


def test_partition_is_checked():
    assert update_run_config(RunConfig(), {"partition": "shards"}).partition == "shards"
    with pytest.raises(ConfigError) as info:
        update_run_config(RunConfig(), {"partition": "random", "alpha": 0})
    assert set(info.value.fields) == {"partition", "alpha"}


def test_server_threads_default_to_one_per_core_and_refuse_negatives(capsys):
    assert run_server.parse_args([]).torch_threads == 0  # main() leaves PyTorch's thread-per-core default
    with pytest.raises(SystemExit):
        run_server.parse_args(["--torch-threads", "-1"])
    assert "--torch-threads must be 0 (one per core) or a number of threads" in capsys.readouterr().err


def test_gevent_serves_edges_only(capsys, tmp_path):
    """The leader's torch work would stall a cooperative server: --wsgi gevent is refused for it in one line."""
    edge = ["--role", "edge", "--leader-url", "http://leader:5000", "--message-queue", "redis://q:6379/0",
            "--state-dir", str(tmp_path)]
    args = run_server.parse_args([*edge, "--wsgi", "gevent"])
    assert run_server.build_config(args).async_mode == "gevent"
    assert run_server.build_config(run_server.parse_args(edge)).async_mode == "threading"
    with pytest.raises(SystemExit):
        run_server.parse_args(["--wsgi", "gevent"])
    assert "--wsgi gevent is for --role edge" in capsys.readouterr().err


def test_the_schema_the_flags_and_the_checks_come_from_one_definition():
    """Every RunConfig field is a run_server.py flag with the field's default, a property of the JSON Schema
    with its bounds or choices, and checked with the same bounds: adding a field is one line."""
    import run_server
    from app.config import SETTINGS, config_schema

    args = run_server.parse_args([])
    schema = config_schema()["properties"]
    assert list(schema) == list(SETTINGS) == [f.name for f in dataclasses.fields(RunConfig)]
    for name, flag, kind, setting in run_server.run_flags():
        assert getattr(args, name) == getattr(RunConfig(), name) == schema[name]["default"], name
        if "enum" in schema[name]:
            assert schema[name]["enum"] == list(setting.choices())
        else:  # just past each bound is refused, as the schema says
            step = 1 if kind == "int" else 1e-9
            for key, outside in (("minimum", -step), ("exclusiveMinimum", 0), ("maximum", step),
                                 ("exclusiveMaximum", 0)):
                if key in schema[name]:
                    with pytest.raises(ConfigError):
                        update_run_config(RunConfig(), {name: schema[name][key] + outside})
    assert run_server.parse_args(["--min-clients", "4"]).min_fit_clients == 4  # the one flag named otherwise
