"""Device facts read from a Jetson's files: the L4T release and the JetPack it belongs to."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg.edge.device import jetpack_for, l4t_release


@pytest.mark.parametrize(
    ("release_line", "l4t", "jetpack"),
    [
        ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64", "36.4.3", "6.2"),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64", "36.4.0", "6.1"),
        ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64", "36.3.0", "6.0"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "35.4.1", "5.1"),
        ("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, EABI: aarch64", "32.7.4", "4"),
    ],
)
def test_l4t_and_jetpack_from_nv_tegra_release(tmp_path: Path, release_line: str, l4t: str, jetpack: str) -> None:
    path = tmp_path / "nv_tegra_release"
    path.write_text(release_line + "\n")
    assert l4t_release(path) == l4t
    assert jetpack_for(l4t) == jetpack


def test_no_release_file_is_no_jetson(tmp_path: Path) -> None:
    assert l4t_release(tmp_path / "absent") is None
    assert jetpack_for("38.2.0") == "unknown"
