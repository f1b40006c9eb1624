"""Device configuration: typed, strict, with key paths in every error and secrets kept out of the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cellseg.cli import main
from cellseg.edge.config import Secret, load_config, parse_config, read_secret
from cellseg.edge.errors import ConfigError
from tests.conftest import SHIPPED_MODEL

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "systemd" / "cellseg.yaml"


def _base() -> dict[str, Any]:
    return {"device_id": "scope-1", "model": "m.onnx", "source": {"kind": "folder", "path": "/data/in"}}


def test_the_shipped_default_config_is_valid() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.device_id == "microscope-1" and config.source.kind == "folder"
    assert config.topic_prefix == "cellseg/microscope-1"
    assert config.mqtt.password is None  # no secret ships in the file


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(device_id="scope 1"), "device_id: String should match pattern"),
        (lambda c: c.pop("source"), "source: Field required"),
        (lambda c: c.update(modle="x"), "modle: Extra inputs are not permitted"),
        (lambda c: c["source"].update(kind="webcam"), "source.kind: Input should be"),
        (lambda c: c["source"].pop("path"), "source: source kind 'folder' needs 'path'"),
        (lambda c: c.update(source={"kind": "rtsp", "url": "http://cam"}), "url must start with rtsp://"),
        (lambda c: c["source"].update(interval_s=-1), "source.interval_s: Input should be greater than or equal to 0"),
        (lambda c: c.update(mqtt={"port": 0}), "mqtt.port: Input should be greater than or equal to 1"),
        (lambda c: c.update(mqtt={"prefix": "lab/#"}), "mqtt.prefix: the prefix must be a topic"),
        (lambda c: c.update(mqtt={"password": {"file": "/p"}}), "mqtt: 'password' needs 'username'"),
        (lambda c: c.update(mqtt={"tls": {"cert_file": "/c.pem"}}), "mqtt.tls: 'cert_file' and 'key' go together"),
        (lambda c: c.update(mqtt={"username": "u", "password": {"file": "/p", "credential": "x"}}),
         "mqtt.password: give exactly one of 'file' and 'credential'"),
        (lambda c: c.update(postprocess={"conf": 1.5}), "postprocess.conf: Input should be less than or equal to 1"),
        (lambda c: c.update(spool={"when_full": "explode"}), "spool.when_full: Input should be"),
    ],
)  # fmt: skip
def test_each_problem_is_named_by_its_key_path(change: Any, message: str) -> None:
    config = _base()
    change(config)
    with pytest.raises(ConfigError, match=r"cellseg\.yaml: ") as info:
        parse_config(config, "cellseg.yaml")
    assert message in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    config = _base() | {"mqtt": {"port": 99999, "keepalive_s": 1}, "log_level": "LOUD"}
    with pytest.raises(ConfigError) as info:
        parse_config(config, "c.yaml")
    lines = str(info.value).splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["log_level", "mqtt.port", "mqtt.keepalive_s"]


def test_a_password_in_the_file_is_refused_and_never_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base() | {"mqtt": {"username": "u", "password": "s3cret-Pa55"}}))
    assert main(["validate-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "mqtt.password: a password in the config file is refused" in err
    assert "s3cret-Pa55" not in err


def test_secrets_from_a_file_and_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    assert read_secret(Secret(file=tmp_path / "pw")) == "from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret(Secret(credential="mqtt-password")) == "from-credential"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "cannot read secret from"),
        ("empty", "is empty"),
        ("no-credentials-dir", "needs $CREDENTIALS_DIRECTORY"),
    ],
)
def test_unreadable_secrets_name_where_not_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: str, message: str
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    if setup == "empty":
        (tmp_path / "pw").write_text("")
    secret = Secret(credential="pw") if setup == "no-credentials-dir" else Secret(file=tmp_path / "pw")
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")):
        read_secret(secret)


def test_credential_names_are_not_paths() -> None:
    with pytest.raises(ConfigError, match="a credential is a name, not a path"):
        parse_config(_base() | {"mqtt": {"username": "u", "password": {"credential": "../etc/shadow"}}})


def test_validate_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The default names a device's folders (/var/lib/cellseg/incoming, /etc/cellseg/trusted-keys).
    assert main(["validate-config", "--schema-only", str(DEFAULT_CONFIG)]) == 0
    assert "OK, schema only (device microscope-1" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: [unclosed\n")
    assert main(["validate-config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate-config", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main(["validate-config", str(tmp_path / "list.yaml")]) == 2
    assert "the top level must be a mapping" in capsys.readouterr().err


def test_without_a_model_the_fallback_is_the_shipped_model() -> None:
    config = parse_config({k: v for k, v in _base().items() if k != "model"})
    assert config.model is None
    assert config.fallback_model.read_bytes() == SHIPPED_MODEL.read_bytes()
    assert parse_config(_base()).fallback_model == Path("m.onnx")


def _device_config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """A configuration whose every named file exists, as install.sh leaves a device."""
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    config: dict[str, Any] = {
        "device_id": "scope-1",
        "model": str(SHIPPED_MODEL),
        "source": {"kind": "folder", "path": str(tmp_path / "in")},
        "mqtt": {
            "username": "lab",
            "password": {"file": str(tmp_path / "pw")},
            "tls": {"ca_file": str(tmp_path / "ca.crt")},
        },
        "flash": {"trusted_keys": [str(tmp_path / "keys")]},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    return config


def _truncated_model(tmp_path: Path) -> str:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(SHIPPED_MODEL.read_bytes()[:200_000])
    return str(broken)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {"model": str(t / "missing.onnx")}, "model: {t}/missing.onnx does not exist"),
        (lambda t: {"model": _truncated_model(t)}, "model: {t}/broken.onnx: ONNX Runtime cannot load it"),
        (lambda t: {"mqtt__password": {"file": str(t / "nopw")}}, "mqtt.password: {t}/nopw does not exist"),
        (lambda t: {"mqtt__tls": {"ca_file": str(t / "no-ca.crt")}}, "mqtt.tls.ca_file: {t}/no-ca.crt does not exist"),
        (lambda t: {"source": {"kind": "folder", "path": str(t / "pw")}}, "source.path: {t}/pw is not a folder"),
        (lambda t: {"source": {"kind": "video", "path": str(t / "v.mp4")}}, "source.path: {t}/v.mp4 does not exist"),
        (lambda t: {"flash": {"trusted_keys": [str(t / "kyes")]}}, "flash.trusted_keys.0: {t}/kyes does not exist"),
    ],
    ids=["missing model", "truncated model", "missing password file", "missing CA", "folder is a file",
         "missing video", "misspelt keys folder"],
)  # fmt: skip
def test_validate_config_checks_the_files_it_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_device_config(tmp_path)))
    assert main(["validate-config", str(good)]) == 0
    assert "OK, and the files it names" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_device_config(tmp_path, **change(tmp_path))))
    assert main(["validate-config", str(bad)]) == 2
    assert f"bad.yaml: {message.format(t=tmp_path)}" in capsys.readouterr().err
    # Written for another machine: the schema alone is checked.
    assert main(["validate-config", "--schema-only", str(bad)]) == 0
