"""The device configuration: one YAML file, declared once as typed models.

Every section forbids unknown keys (a misspelt key is an error, not a silently ignored
setting), bounds each number and describes each field; cross-field rules live in validators.
``cellseg validate-config FILE`` prints one line per problem, starting with its key path.

Secrets (the MQTT password, TLS private keys) never sit in the YAML: the file names a file, or
a systemd credential (``LoadCredential=`` puts it in ``$CREDENTIALS_DIRECTORY``), and
:func:`read_secret` reads it when connecting. Nothing here logs a secret's value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellseg.edge.errors import CellsegError, ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Section):
    backend: str = Field(
        "auto",
        description="a backend's name (onnxruntime, tensorrt), or 'auto': the backend that runs the engine at hand",
    )
    threads: int | None = Field(None, ge=1, le=256, description="CPU inference threads (default: all cores)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="float precision where the backend offers a choice (OpenVINO: bf16 on CPUs with it); "
        "INT8 comes from a Q/DQ model, TensorRT's precision from its bundle",
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from cellseg.edge.engines.registry import AUTO, BACKENDS

        if value != AUTO and value not in BACKENDS:
            raise ValueError(f"{value!r} is not a backend; known: {AUTO}, {', '.join(BACKENDS)}")
        return value


class NameTimeConfig(_Section):
    pattern: str = Field(..., description="regular expression on the file name with a (?P<datetime>...) or a "
                         "(?P<index>...) group, e.g. 't(?P<index>\\d+)'")  # fmt: skip
    format: str = Field("%Y%m%d_%H%M%S", description="strptime format of the datetime group")
    interval_s: float | None = Field(None, gt=0.0, description="seconds between frames (index group)")
    start: str | None = Field(None, description="ISO 8601 time of frame index 0 (index group)")


class SourceConfig(_Section):
    kind: Literal["folder", "images", "video", "v4l2", "csi", "rtsp"] = Field(..., description="where frames come from")
    path: Path | None = Field(None, description="folder to watch (folder) or video file (video)")
    images: list[Path] = Field(default_factory=list, description="image files, in order (images)")
    pattern: str = Field("*", description="file name pattern in a watched folder")
    device: str | None = Field(None, description="camera device, e.g. /dev/video0 (v4l2)")
    url: str | None = Field(None, description="stream URL, rtsp://... (rtsp)")
    pipeline: str | None = Field(None, description="GStreamer pipeline ending in appsink (csi; overrides the default)")
    width: int | None = Field(None, ge=16, le=16384, description="requested frame width (cameras)")
    height: int | None = Field(None, ge=16, le=16384, description="requested frame height (cameras)")
    interval_s: float = Field(0.0, ge=0.0, le=86400.0, description="seconds between measurements (0: every frame)")
    loop: bool = Field(False, description="start again at the end (folder of images, video, image list)")
    time_from_name: NameTimeConfig | None = Field(
        None, description="acquisition times from file names, for images whose metadata has none"
    )
    timezone: str | None = Field(
        None, description="IANA zone of times written without one (TIFF/EXIF; default: this machine's)"
    )
    max_megapixels: float = Field(
        100.0,
        gt=0.0,
        le=10000.0,
        description="image files with more pixels are refused from their header, before decoding "
        "(a 20000x20000 image would take gigabytes; 100 is 10000x10000)",
    )

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @model_validator(mode="after")
    def _needs(self) -> SourceConfig:
        required = {"folder": "path", "video": "path", "images": "images", "v4l2": "device", "rtsp": "url"}
        key = required.get(self.kind)
        if key is not None and not getattr(self, key):
            raise ValueError(f"source kind '{self.kind}' needs '{key}'")
        if self.url is not None and not self.url.startswith(("rtsp://", "rtsps://")):
            raise ValueError("url must start with rtsp:// or rtsps://")
        if self.timezone is not None or self.time_from_name is not None:
            from cellseg.edge.capture.acquisition import NamePattern, acquisition_rule

            t = self.time_from_name
            try:
                acquisition_rule(NamePattern(t.pattern, t.format, t.interval_s, t.start) if t else None, self.timezone)
            except CellsegError as e:
                raise ValueError(str(e)) from e
        return self


class PostprocessOverrides(_Section):
    conf: float | None = Field(None, ge=0.0, le=1.0, description="confidence threshold (default: the model's)")
    iou: float | None = Field(None, gt=0.0, le=1.0, description="NMS IoU threshold (default: the model's)")
    max_det: int | None = Field(None, ge=1, le=100000, description="most cells per frame (default: the model's)")


class MeasurementConfig(_Section):
    pixel_size_um: float | None = Field(None, gt=0.0, le=1000.0, description="micrometres per pixel, for areas in µm²")


class Secret(_Section):
    """Where a secret is: a file, or a systemd credential name. Never the value itself."""

    file: Path | None = Field(None, description="file holding the secret (its first line)")
    credential: str | None = Field(None, description="systemd credential name, read from $CREDENTIALS_DIRECTORY")

    @model_validator(mode="after")
    def _one(self) -> Secret:
        if (self.file is None) == (self.credential is None):
            raise ValueError("give exactly one of 'file' and 'credential'")
        if self.credential is not None and ("/" in self.credential or self.credential in {".", ".."}):
            raise ValueError("a credential is a name, not a path")
        return self


class TlsConfig(_Section):
    ca_file: Path | None = Field(None, description="CA certificate to trust (default: the system's)")
    cert_file: Path | None = Field(None, description="client certificate, for brokers that require one")
    key: Secret | None = Field(None, description="the client certificate's private key")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key is None):
            raise ValueError("'cert_file' and 'key' go together")
        return self


class MqttConfig(_Section):
    enabled: bool = Field(True, description="publish to a broker")
    host: str = Field("localhost", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual with TLS)")
    prefix: str | None = Field(None, description="topic prefix (default: cellseg/<device_id>)")
    client_id: str | None = Field(None, max_length=128, description="MQTT client id (default: cellseg-<device_id>)")
    keepalive_s: int = Field(60, ge=5, le=3600, description="keep-alive interval")
    username: str | None = Field(None, description="user name, when the broker wants one")
    password: Secret | None = Field(None, description="where the password is (file or credential)")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent: plain TCP")
    homeassistant_discovery: bool = Field(False, description="publish Home Assistant discovery for count/confluence")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant discovery prefix")

    @field_validator("password", mode="before")
    @classmethod
    def _no_clear_password(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                "a password in the config file is refused: write it to a file readable only by the "
                "service and give 'password: {file: PATH}', or use a systemd credential"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "+#") or value.endswith("/")):
            raise ValueError("the prefix must be a topic without wildcards (+, #) or a trailing '/'")
        return value

    @model_validator(mode="after")
    def _user(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("'password' needs 'username'")
        return self


class SpoolConfig(_Section):
    path: Path | None = Field(None, description="SQLite spool file (default: <state_dir>/spool.sqlite)")
    max_messages: int = Field(1_000_000, ge=100, description="most measurements kept while the broker is away")
    when_full: Literal["drop_oldest", "stop_measuring"] = Field(
        "drop_oldest", description="what to do at max_messages; either way it is reported in the state topic"
    )


class OverlayConfig(_Section):
    dir: Path | None = Field(None, description="write overlay pictures here (absent: only on request)")
    every_n: int = Field(1, ge=1, description="write every n-th frame's overlay")


class FlashConfig(_Section):
    trusted_keys: list[Path] = Field(
        default_factory=lambda: [Path("/etc/cellseg/trusted-keys")],
        description="Ed25519 public keys (PEM files, or folders of *.pub) whose bundles this device accepts",
    )
    max_download_mb: float = Field(2048.0, gt=0.0, le=65536.0, description="largest bundle a flash downloads")
    allow_file_urls: bool = Field(
        False, description="accept file:// URLs in MQTT cmd/flash (local files the daemon can read); else http(s) only"
    )


class GrowthConfig(_Section):
    enabled: bool = Field(True, description="keep a history per series and publish its growth fit")
    target_confluence_pct: float = Field(70.0, gt=0.0, le=100.0, description="confluence at which passage is due")
    series: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="the series this source's frames belong to (default: the device id)",
    )  # fmt: skip
    series_from_name: str | None = Field(
        None,
        description="regular expression with a (?P<series>...) group on the file name, e.g. one series per "
        "well: '_(?P<series>[A-H][0-9]+)_'; files that do not match go to 'series'",
    )
    history_days: float = Field(90.0, gt=0.0, le=3650.0, description="days of history kept per series")

    @field_validator("series_from_name")
    @classmethod
    def _series_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            groups = re.compile(value).groupindex
        except re.error as e:
            raise ValueError(f"{value!r} is not a regular expression: {e}") from e
        if "series" not in groups:
            raise ValueError("series_from_name needs a (?P<series>...) group")
        return value


class TilingConfig(_Section):
    mode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="cut frames larger than the model's training frames into overlapping tiles: auto (when "
        "letterboxing would shrink cells by more than a quarter), on (whenever a frame exceeds a tile) or off",
    )
    tile_px: int | None = Field(
        None, ge=64, le=65536,
        description="tile side in frame pixels (default: the model's training frame size, scaled by the ratio of "
        "its training pixel size to measurement.pixel_size_um when both are known)",
    )  # fmt: skip
    overlap_px: int | None = Field(
        None, ge=0, le=32768, description="least overlap of neighbouring tiles (default: a quarter of the tile)"
    )

    @model_validator(mode="after")
    def _overlap_within_tile(self) -> TilingConfig:
        if self.tile_px is not None and self.overlap_px is not None and self.overlap_px > self.tile_px // 2:
            raise ValueError(f"overlap_px {self.overlap_px} is more than half of tile_px {self.tile_px}")
        return self


class Config(_Section):
    """The whole device configuration."""

    device_id: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                           description="this device's name; part of the MQTT topics")  # fmt: skip
    model: Path | None = Field(
        None,
        description="the fallback model (an ONNX file or an installed bundle folder), run when no engine slot is "
        "active or loads (default: the model shipped with cellseg); an active slot overrides it",
    )
    state_dir: Path = Field(Path("/var/lib/cellseg"), description="where the spool and engine slots live")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    source: SourceConfig
    postprocess: PostprocessOverrides = Field(default_factory=PostprocessOverrides)
    measurement: MeasurementConfig = Field(default_factory=MeasurementConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    overlay: OverlayConfig = Field(default_factory=OverlayConfig)
    flash: FlashConfig = Field(default_factory=FlashConfig)
    growth: GrowthConfig = Field(default_factory=GrowthConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.prefix or f"cellseg/{self.device_id}"

    @property
    def fallback_model(self) -> Path:
        """``model``, else the model shipped with this installation of cellseg (a path that is
        only opened when no engine slot loads, and named in the error if it is missing)."""
        from cellseg.edge.bundles.shipped import shipped_model_path

        return self.model if self.model is not None else shipped_model_path()


def format_errors(error: ValidationError, source: str) -> list[str]:
    """One line per problem: ``key.path: message``."""
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}")
    return lines


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate an already-parsed mapping; ConfigError lists every problem with its key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(format_errors(e, source))) from e


def read_yaml(path: str | Path, error: type[CellsegError] = ConfigError) -> Any:
    """Parse a YAML file; an unreadable or malformed file raises ``error`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), str(path))


def secret_location(secret: Secret) -> Path:
    """The file a secret is in (for libraries that want a path, such as a TLS private key)."""
    if secret.credential is not None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"credential '{secret.credential}' needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)"
            )
        location = Path(directory) / secret.credential
    elif secret.file is not None:
        location = secret.file
    else:  # the model validator rules this out; a hand-built Secret might not
        raise ConfigError("a secret needs a 'file' or a 'credential'")
    return location


def read_secret(secret: Secret) -> str:
    """The secret's value: the first line of its file or credential. Errors name where, never what."""
    location = secret_location(secret)
    try:
        value = location.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read secret from {location}: {e.strerror}") from e
    if not value or not value[0]:
        raise ConfigError(f"secret file {location} is empty")
    return value[0]
