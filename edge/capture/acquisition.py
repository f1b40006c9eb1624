"""When a frame was taken, not when it was measured.

A backlog measured after an outage, or last week's time-lapse measured today, must keep the
times its frames were taken: growth curves are drawn against them. For an image file the time
comes from, in order:

1. the image's own metadata: OME-XML ``AcquisitionDate``, Micro-Manager's ``Time``/``StartTime``,
   EXIF ``DateTimeOriginal`` (with ``OffsetTimeOriginal`` when given), TIFF ``DateTime``;
2. a pattern on the file name, configured (``source.time_from_name``): a date-time group
   (``(?P<datetime>...)`` read with ``format``) or a frame index (``(?P<index>\\d+)``) times an
   interval after a start;
3. the file's modification time.

Times without a zone in the file (TIFF and EXIF are usually local wall time of the microscope's
PC) are read in ``timezone`` (default: this machine's). Live cameras use the moment of capture.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cellseg.edge.errors import ConfigError

logger = logging.getLogger(__name__)

_TIFF_SUFFIXES = (".tif", ".tiff")
_TIFF_TIME = "%Y:%m:%d %H:%M:%S"


@dataclass(frozen=True)
class Acquired:
    """An acquisition time (seconds since the epoch) and where it was read (``ome``,
    ``micromanager``, ``exif``, ``tiff``, ``file-name``, ``mtime``, ``capture``)."""

    at: float
    source: str

    def iso(self) -> str:
        return iso_time(self.at)


def iso_time(epoch_s: float) -> str:
    """ISO 8601 in UTC with its zone, to the millisecond: ``2018-01-01T09:10:12.000+00:00``."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class NamePattern:
    """Acquisition times from file names (``source.time_from_name``).

    Attributes:
        pattern: a regular expression searched in the file name, with a ``datetime`` group (read
            with ``format``) or an ``index`` group (the frame number).
        format: ``strptime`` format of the ``datetime`` group.
        interval_s: seconds between frames, for ``index``.
        start: the time of index 0 (ISO 8601), for ``index``.
    """

    pattern: str
    format: str = "%Y%m%d_%H%M%S"
    interval_s: float | None = None
    start: str | None = None

    def __post_init__(self) -> None:
        try:
            groups = re.compile(self.pattern).groupindex
        except re.error as e:
            raise ConfigError(f"time_from_name.pattern {self.pattern!r} is not a regular expression: {e}") from e
        if "datetime" not in groups and "index" not in groups:
            raise ConfigError("time_from_name.pattern needs a (?P<datetime>...) or a (?P<index>...) group")
        if "index" in groups and (self.interval_s is None or self.start is None):
            raise ConfigError("time_from_name with an index group needs interval_s and start")
        if self.start is not None:
            _parse_iso(self.start, "time_from_name.start")

    def time_of(self, name: str, zone: tzinfo) -> float | None:
        m = re.search(self.pattern, name)
        if m is None:
            return None
        if "datetime" in m.groupdict() and m.group("datetime") is not None:
            try:
                when = datetime.strptime(m.group("datetime"), self.format)
            except ValueError:
                return None
            return _aware(when, zone).timestamp()
        start = _parse_iso(str(self.start), "time_from_name.start")
        return _aware(start, zone).timestamp() + int(m.group("index")) * float(self.interval_s or 0.0)


def _parse_iso(text: str, what: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ConfigError(f"{what}: {text!r} is not an ISO 8601 time") from e


def _aware(when: datetime, zone: tzinfo) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=zone)


def local_zone() -> tzinfo:
    zone = datetime.now().astimezone().tzinfo
    return zone if zone is not None else timezone.utc


def acquisition_rule(names: NamePattern | None = None, timezone_name: str | None = None) -> Callable[[Path], Acquired]:
    """``acquisition_time`` with a file-name pattern and a zone (an IANA name) fixed, for a source."""
    zone: tzinfo | None = None
    if timezone_name is not None:
        try:
            zone = ZoneInfo(timezone_name)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ConfigError(f"timezone {timezone_name!r} is not an IANA time zone (e.g. Europe/Berlin)") from e
    return functools.partial(acquisition_time, names=names, zone=zone)


def acquisition_time(path: Path, names: NamePattern | None = None, zone: tzinfo | None = None) -> Acquired:
    """When the image at ``path`` was taken (see the module's docstring for the order)."""
    zone = zone or local_zone()
    if path.suffix.lower() in _TIFF_SUFFIXES:
        try:
            found = _tiff_time(path, zone)
        except Exception as e:  # metadata is a hint: a file tifffile cannot parse still has a name and an mtime
            logger.debug("no acquisition time in %s's metadata: %s", path, e)
            found = None
        if found is not None:
            return found
    if names is not None:
        at = names.time_of(path.name, zone)
        if at is not None:
            return Acquired(at, "file-name")
    return Acquired(path.stat().st_mtime, "mtime")


def _tiff_time(path: Path, zone: tzinfo) -> Acquired | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if tif.is_ome and tif.ome_metadata:
            at = _ome_time(tif.ome_metadata)
            if at is not None:
                return Acquired(at, "ome")
        if tif.is_micromanager:
            at = _micromanager_time(tif.micromanager_metadata or {}, zone)
            if at is not None:
                return Acquired(at, "micromanager")
        tags = page.tags  # type: ignore[union-attr]
        exif = tags.get("ExifTag")
        if exif is not None and isinstance(exif.value, dict) and exif.value.get("DateTimeOriginal"):
            at = _exif_time(exif.value, zone)
            if at is not None:
                return Acquired(at, "exif")
        stamp = tags.get("DateTime")
        if stamp is not None:
            try:
                return Acquired(
                    _aware(datetime.strptime(str(stamp.value).strip(), _TIFF_TIME), zone).timestamp(), "tiff"
                )
            except ValueError:
                return None
    return None


def _ome_time(xml: str) -> float | None:
    root = ElementTree.fromstring(xml)
    for element in root.iter():
        if element.tag.endswith("AcquisitionDate") and element.text:
            try:
                return _aware(_parse_iso(element.text.strip(), "OME AcquisitionDate"), timezone.utc).timestamp()
            except ConfigError:
                return None
    return None


def _micromanager_time(meta: dict[str, Any], zone: tzinfo) -> float | None:
    summary = meta.get("Summary", meta)
    for key in ("Time", "StartTime"):
        text = summary.get(key) if isinstance(summary, dict) else None
        if not text:
            continue
        # Micro-Manager writes "2018-01-01 09:10:12.345 +0100" (1.4) or ISO 8601 (2.0).
        for fmt in ("%Y-%m-%d %H:%M:%S.%f %z", "%Y-%m-%d %H:%M:%S %z", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
            try:
                return _aware(datetime.strptime(str(text).strip(), fmt), zone).timestamp()
            except ValueError:
                continue
        try:
            return _aware(_parse_iso(str(text), "Micro-Manager time"), zone).timestamp()
        except ConfigError:
            continue
    return None


def _exif_time(exif: dict[str, Any], zone: tzinfo) -> float | None:
    try:
        when = datetime.strptime(str(exif["DateTimeOriginal"]).strip(), _TIFF_TIME)
    except ValueError:
        return None
    offset = exif.get("OffsetTimeOriginal")
    m = re.fullmatch(r"([+-])(\d\d):(\d\d)", str(offset).strip()) if offset else None
    if m:
        sign = 1 if m.group(1) == "+" else -1
        zone = timezone(sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
    return _aware(when, zone).timestamp()
