"""Gateway settings (serving/settings.py on core/settings.py): YAML < environment < --set, unknown
keys and wrong types refused with the key and what it accepts, and AQ_* variables that are not
gateway settings (the client scripts' AQ_API_KEY) ignored with one warning instead of stopping it."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from adaptive_quant.core.routing import Priority, RoutingConfig
from adaptive_quant.core.settings import ConfigError
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import (
    ServeSettings,
    SettingsError,
    ignored_variables,
    load_settings,
    parse_set,
)
from gateway_process import wait_ready
from gateway_repo import b64_instance, build_repo, images
from http_server import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "configs" / "serve.yaml"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    return p


def classify(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json={"instances": [b64_instance(images(1)[0])]}, timeout=30)


# ----------------------------------------------------------------------------- stray AQ_* variables


def test_a_gateway_started_with_client_variables_in_its_environment_serves(repo):
    """AQ_API_KEY is the key scripts/predict.py and loadtest send; it used to stop the gateway."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "AQ_API_KEY": "x", "AQ_SOMETHING_ELSE": "1"}
    cmd = [sys.executable, "-m", "adaptive_quant.cli.serve", "--config", str(SERVE_YAML)]
    proc = subprocess.Popen(
        [*cmd, "--repository", str(repo), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, timeout_s=60)
        r = classify(url)  # AQ_API_KEY is not the gateway's key: no key is asked for
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    warnings = [line for line in err.splitlines() if "ignoring environment variables" in line]
    assert len(warnings) == 1, err
    assert "AQ_API_KEY, AQ_SOMETHING_ELSE: not gateway settings" in warnings[0]


def test_stray_variables_are_ignored_with_one_warning_and_the_gateway_serves(repo, caplog):
    env = {"AQ_API_KEY": "s3cret", "AQ_FOO": "1", "AQ_SERVER__PORT": "9100", "HOME": "/root"}
    with caplog.at_level(logging.WARNING, logger="adaptive_quant.serving.settings"):
        s = load_settings(overrides={"repository": str(repo)}, environ=env)
    assert s.server.port == 9100 and s.server.api_key == ""  # the client's key is not the gateway's
    [record] = caplog.records
    assert record.getMessage() == (
        "ignoring environment variables AQ_API_KEY, AQ_FOO: not gateway settings; "
        "gateway settings look like AQ_SERVER__PORT"
    )
    assert "s3cret" not in caplog.text
    with serve_in_thread(create_app(s)) as url:
        assert classify(url).status_code == 200
    assert ignored_variables(env) == ["AQ_API_KEY", "AQ_FOO"]


def test_a_misspelt_key_of_a_gateway_section_is_still_refused():
    # AQ_SERVER__PROT names the server section: a typo of a setting, not someone else's variable
    with pytest.raises(SettingsError) as e:
        load_settings(environ={"AQ_SERVER__PROT": "9000"})
    assert str(e.value) == (
        "unknown setting 'server.prot' (from AQ_SERVER__PROT); known here: access_log, api_key, api_key_file, "
        "coalesce_writes, drain_timeout_s, grpc_port, host, keep_alive_s, log_level, port, workers"
    )


def test_a_known_variable_with_a_bad_value_names_the_key_and_the_variable():
    with pytest.raises(SettingsError) as e:
        load_settings(environ={"AQ_SERVER__PORT": "eighty", "AQ_API_KEY": "x"})
    assert str(e.value) == "setting 'server.port' (from AQ_SERVER__PORT): must be an integer, got 'eighty'"
    with pytest.raises(SettingsError, match=r"'server\.port' \(from AQ_SERVER__PORT\): must be > 0, got -1"):
        load_settings(environ={"AQ_SERVER__PORT": "-1"})


# ----------------------------------------------------------------------------- sources and precedence


def test_nested_environment_keys_set_every_kind_of_setting(tmp_path):
    env = {
        "AQ_REPOSITORY": "/models",
        "AQ_SERVER__PORT": "9000",
        "AQ_SERVER__ACCESS_LOG": "true",
        "AQ_BACKEND__KIND": "triton",
        "AQ_ROUTING__DEFAULT_PRIORITY": "speed",
        "AQ_LATENCY__EWMA_ALPHA": "0",
        "AQ_VARIANTS": "int8,fp32",
        "AQ_MEMORY__ENABLED": "true",
    }
    s = load_settings(SERVE_YAML, environ=env)
    assert (s.repository, s.server.port, s.server.access_log, s.backend.kind) == ("/models", 9000, True, "triton")
    assert s.routing.default_priority is Priority.SPEED and s.latency.ewma_alpha == 0.0
    assert s.variants == ["int8", "fp32"] and s.memory.enabled
    assert s.server.host == "127.0.0.1"  # what the environment does not set comes from the file


def test_precedence_is_yaml_then_environment_then_set(tmp_path):
    path = write(tmp_path, "server:\n  port: 7000\n  host: 0.0.0.0\nbreaker:\n  failures: 5\n")
    assert load_settings(path, environ={}).server.port == 7000
    s = load_settings(path, environ={"AQ_SERVER__PORT": "8000", "AQ_BREAKER__COOLDOWN_S": "1.5"})
    assert (s.server.port, s.server.host, s.breaker.failures, s.breaker.cooldown_s) == (8000, "0.0.0.0", 5, 1.5)
    s = load_settings(path, parse_set(["server.port=9000"]), environ={"AQ_SERVER__PORT": "8000"})
    assert (s.server.port, s.server.host) == (9000, "0.0.0.0")
    # a bad environment value that --set overrides is never used, so it does not stop the service
    assert load_settings(path, {"server.port": 9001}, environ={"AQ_SERVER__PORT": "x"}).server.port == 9001


def test_text_settings_keep_the_text_as_typed(tmp_path):
    s = load_settings(overrides=parse_set(["server.api_key=0x1F"]), environ={})
    assert s.server.api_key == "0x1F"
    s = load_settings(environ={"AQ_SERVER__API_KEY": "yes", "AQ_BACKEND__TRITON_URL": "10.0.0.1:8001"})
    assert (s.server.api_key, s.backend.triton_url) == ("yes", "10.0.0.1:8001")  # kept as typed
    # in a YAML file an unquoted 0x1F is the number 31: refused, not silently turned into "31"
    path = write(tmp_path, "server:\n  api_key: 0x1F\n")
    with pytest.raises(SettingsError) as e:
        load_settings(path, environ={})
    assert str(e.value) == "setting 'server.api_key': must be text (quote it in YAML), got 31"
    assert load_settings(write(tmp_path, 'server:\n  api_key: "0x1F"\n'), environ={}).server.api_key == "0x1F"


# ----------------------------------------------------------------------------- refusals


def test_unknown_yaml_keys_are_refused_with_the_known_ones(tmp_path):
    with pytest.raises(SettingsError) as e:
        load_settings(write(tmp_path, "routing:\n  foo: 1\n"), environ={})
    assert str(e.value) == (
        "unknown setting 'routing.foo'; known here: accuracy_per_halving, default_priority, load_price, speed_tolerance"
    )
    with pytest.raises(SettingsError, match=r"unknown setting 'rooting'; known here: backend, batching, breaker"):
        load_settings(write(tmp_path, "rooting:\n  foo: 1\n"), environ={})


def test_unknown_set_keys_are_refused_with_the_known_ones():
    with pytest.raises(SettingsError) as e:
        load_settings(overrides=parse_set(["limits.max_instance=3"]), environ={})
    assert (
        str(e.value)
        == "unknown setting 'limits.max_instance'; known here: max_instances, max_request_bytes, max_tensor_request_bytes"
    )
    with pytest.raises(SettingsError, match=r"--set 'server\.port': expected key\.path=value"):
        parse_set(["server.port"])


def test_wrong_types_name_the_key_and_what_it_accepts(tmp_path):
    cases = {
        "server.port=eighty": "setting 'server.port': must be an integer, got 'eighty'",
        "server.port=80.5": "setting 'server.port': must be an integer, got 80.5",
        "server.access_log=3": "setting 'server.access_log': must be true or false, got 3",
        "deadline.grace_ms=soon": "setting 'deadline.grace_ms': must be a number, got 'soon'",
        "backend.kind=tensorrt": "setting 'backend.kind': must be one of 'embedded', 'triton' or 'ray', got 'tensorrt'",
        "routing.default_priority=fast": (
            "setting 'routing.default_priority': must be one of 'quality', 'balanced' or 'speed', got 'fast'"
        ),
        "routing.speed_tolerance=2": "setting 'routing.speed_tolerance': must be in [0, 1], got 2",
        "batching.max_queue_delay_us=-1": "setting 'batching.max_queue_delay_us': must be >= 0, got -1",
        "server=8000": "setting 'server': must be a mapping of keys (a section), got 8000",
    }
    for item, message in cases.items():
        with pytest.raises(SettingsError) as e:
            load_settings(overrides=parse_set([item]), environ={})
        assert str(e.value) == message, item
    with pytest.raises(SettingsError, match=r"settings file .*missing\.yaml does not exist"):
        load_settings(tmp_path / "missing.yaml", environ={})
    with pytest.raises(SettingsError, match="must hold a mapping of keys at the top level, got list"):
        load_settings(write(tmp_path, "- 1\n"), environ={})


def test_cross_field_checks_name_the_field():
    with pytest.raises(SettingsError) as e:
        load_settings(overrides={"memory.server_high_pct": 50, "memory.server_low_pct": 60}, environ={})
    assert str(e.value) == "setting 'memory.server_low_pct': must be < memory.server_high_pct (50), got 60"
    # a section built on its own says where it sits in the settings
    with pytest.raises(ConfigError, match=r"^setting 'routing\.load_price': must be >= 0, got -1$"):
        RoutingConfig(load_price=-1)
    # the latency model learns how the backend batches
    assert load_settings(overrides={"batching.max_batch_size": "8"}, environ={}).latency.max_batch_size == 8


def test_settings_error_is_the_one_config_error_and_sections_are_frozen():
    assert SettingsError is ConfigError and issubclass(SettingsError, ValueError)
    s = load_settings(environ={})
    with pytest.raises(ValueError):
        s.routing.load_price = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.server.port = 9000  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.variants = ["int8"]  # type: ignore[misc]
    pinned = s.model_copy(update={"variants": ["int8"]})
    assert pinned.variants == ["int8"] and s.variants == []
    assert ServeSettings(repository="r").repository == "r"


def test_settings_built_directly_read_the_process_environment(monkeypatch):
    monkeypatch.setenv("AQ_SERVER__PORT", "9100")
    monkeypatch.setenv("AQ_SERVER__API_KEY", "0x1F")
    monkeypatch.setenv("AQ_API_KEY", "the client's")
    s = ServeSettings(repository="r")
    assert (s.repository, s.server.port, s.server.api_key) == ("r", 9100, "0x1F")
    assert load_settings().server.port == 9100  # environ=None: os.environ
    monkeypatch.setenv("AQ_SERVER__PORT", "-1")
    with pytest.raises(SettingsError, match=r"^setting 'server\.port' \(from AQ_SERVER__PORT\): must be > 0, got -1$"):
        ServeSettings()
