"""When a frame was taken: from the image's metadata, else a file-name pattern, else the mtime;
in the zone the file's clock was in when it writes none."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import tifffile

from cellseg.edge.capture.acquisition import NamePattern, _exif_time, acquisition_rule, acquisition_time, iso_time
from cellseg.edge.capture.files import ImageListSource
from cellseg.edge.config import parse_config
from cellseg.edge.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")
PIXELS = np.zeros((8, 8), np.uint16)


def test_the_t98g_frames_take_their_times_from_their_names(data_root: Path) -> None:
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    rule = acquisition_rule(NamePattern(r"t(?P<index>\d+)\.tif$", interval_s=612.0, start="2018-01-01T09:00:00"),
                            "Europe/Berlin")  # fmt: skip
    times = [rule(p) for p in frames]
    assert {t.source for t in times} == {"file-name"}  # these TIFFs carry no time of their own
    assert times[0].iso() == "2018-01-01T08:10:12.000+00:00"  # t01: 09:10:12 in Berlin, 10.2 min after t00
    assert np.allclose(np.diff([t.at for t in times]), 612.0)


def test_tiff_datetime_is_read_in_the_configured_zone(tmp_path: Path) -> None:
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, PIXELS, datetime=datetime(2026, 7, 1, 14, 30, 5))
    found = acquisition_time(path, zone=BERLIN)
    assert found.source == "tiff" and found.iso() == "2026-07-01T12:30:05.000+00:00"  # CEST is UTC+2


def test_ome_acquisition_date_wins_over_the_name(tmp_path: Path) -> None:
    path = tmp_path / "plate_t03.ome.tif"
    ome = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><AcquisitionDate>2026-03-02T10:00:00Z</AcquisitionDate>'
           '<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="8" SizeY="8" SizeC="1" SizeZ="1" '
           'SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/><TiffData/></Pixels></Image></OME>')  # fmt: skip
    tifffile.imwrite(path, PIXELS, description=ome, metadata=None)
    names = NamePattern(r"t(?P<index>\d+)", interval_s=60.0, start="2026-01-01T00:00:00+00:00")
    found = acquisition_time(path, names)
    assert found.source == "ome" and found.iso() == "2026-03-02T10:00:00.000+00:00"


def test_exif_takes_its_own_offset() -> None:
    at = _exif_time({"DateTimeOriginal": "2026:01:05 08:00:00", "OffsetTimeOriginal": "-05:00"}, BERLIN)
    assert iso_time(at or 0.0) == "2026-01-05T13:00:00.000+00:00"


def test_a_date_in_the_name_and_else_the_mtime(tmp_path: Path) -> None:
    named = tmp_path / "well_A1_20260412_061500.png"
    named.write_bytes(b"")
    names = NamePattern(r"(?P<datetime>\d{8}_\d{6})")
    assert acquisition_time(named, names, timezone.utc).iso() == "2026-04-12T06:15:00.000+00:00"
    plain = tmp_path / "frame.png"
    plain.write_bytes(b"")
    os.utime(plain, (1_700_000_000, 1_700_000_000))
    found = acquisition_time(plain, names)
    assert (found.source, found.at) == ("mtime", 1_700_000_000)


def test_sources_stamp_each_frame(data_root: Path) -> None:
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:2]
    rule = acquisition_rule(NamePattern(r"t(?P<index>\d+)", interval_s=612.0, start="2018-01-01T00:00:00Z"))
    got = [sf.frame for sf in ImageListSource(frames, acquired=rule).frames()]
    assert [f.acquired_from for f in got] == ["file-name", "file-name"]
    assert got[1].acquired_at is not None and got[0].acquired_at is not None
    assert got[1].acquired_at - got[0].acquired_at == 612.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"time_from_name": {"pattern": "t(\\d+"}}, "is not a regular expression"),
        ({"time_from_name": {"pattern": "t\\d+"}}, "needs a (?P<datetime>...) or a (?P<index>...) group"),
        ({"time_from_name": {"pattern": "t(?P<index>\\d+)"}}, "needs interval_s and start"),
        ({"time_from_name": {"pattern": "t(?P<index>\\d+)", "interval_s": 60, "start": "monday"}}, "not an ISO 8601"),
        ({"timezone": "Mars/Olympus_Mons"}, "is not an IANA time zone"),
    ],
)
def test_bad_time_settings_are_refused_with_the_reason(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_config({"device_id": "x", "source": {"kind": "images", "images": ["a.png"], **settings}})
