"""Flashing in-process: every bad bundle refused with its own reason, the active slot untouched;
a good one installed, self-tested and activated; rollback; the download limits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cellseg.build.bundle import generate_keypair
from cellseg.edge.bundles.engine_select import open_engine, read_slot_manifest
from cellseg.edge.bundles.flash import REMOTE_SCHEMES, FlashSettings, fetch, flash_file, flash_url, settings_for
from cellseg.edge.bundles.reader import check_files, load_trusted_keys
from cellseg.edge.bundles.slots import SlotStore
from cellseg.edge.device import DeviceFacts, check_compatible, l4t_release
from cellseg.edge.errors import BundleError, SlotError
from tests.bundle_tools import bad_bundles

CPU = DeviceFacts(onnxruntime="1.32.0")


@pytest.fixture
def store(tmp_path: Path) -> SlotStore:
    return SlotStore(tmp_path / "engines")


def _settings(public_key: Path, facts: DeviceFacts = CPU, max_bytes: int = 1 << 30) -> FlashSettings:
    return FlashSettings(trusted_keys=load_trusted_keys([public_key]), max_bytes=max_bytes, facts=facts, threads=2)


def test_a_good_bundle_is_verified_self_tested_and_activated_and_rollback_swaps_back(
    bundles: dict[str, Path], signing_keys: tuple[Path, Path], store: SlotStore
) -> None:
    settings = _settings(signing_keys[1])
    first = flash_file(bundles["fp32"], store, settings)
    assert store.active() == first.slot and store.previous() is None
    assert first.self_test["count"] == first.manifest.reference.count
    second = flash_file(bundles["int8"], store, settings)
    assert store.active() == second.slot and store.previous() == first.slot
    manifest = read_slot_manifest(second.slot)
    assert manifest.engine.precision == "int8" and manifest.gate is not None and manifest.gate["passed"]
    assert manifest.calibration is not None and len(manifest.calibration["sha256"]) == 64
    check_files(second.slot, manifest)
    opened = open_engine(second.slot, threads=1)
    assert opened.engine.precision == "int8" and opened.manifest == manifest
    opened.engine.close()
    assert store.rollback() == first.slot
    assert store.active() == first.slot and store.previous() == second.slot
    # A third flash keeps only the active and the previous slot.
    flash_file(bundles["fp32"], store, settings)
    assert len(list(store.slots.iterdir())) == 2


def test_every_bad_bundle_is_refused_with_its_reason_and_the_active_slot_stays(
    bundles: dict[str, Path], signing_keys: tuple[Path, Path], store: SlotStore, tmp_path: Path
) -> None:
    untrusted, _ = generate_keypair(tmp_path / "keys" / "stranger")
    settings = _settings(signing_keys[1])
    active = flash_file(bundles["fp32"], store, settings).slot
    cases = bad_bundles(bundles["fp32"], signing_keys[0], untrusted, tmp_path)
    reasons = {}
    for name, (bundle, phrase) in cases.items():
        with pytest.raises(BundleError) as e:
            flash_file(bundle, store, settings)
        reasons[name] = str(e.value)
        assert phrase in str(e.value), (name, str(e.value))
        assert store.active() == active, name
        assert [p.name for p in store.slots.iterdir()] == [active.name], name  # no partial slot left behind
    assert len(set(reasons.values())) == len(reasons)  # each refusal says something different
    assert not (tmp_path.parent / "etc").exists() and not list(tmp_path.rglob("evil"))


def test_an_engine_for_another_gpu_or_tensorrt_version_is_refused() -> None:
    from cellseg.edge.bundles.reader import EngineSpec

    spec = EngineSpec(kind="tensorrt", file="model.engine", precision="fp16", tensorrt_version="10.3.0",
                      compute_capability="8.7", l4t="36.4.0")  # fmt: skip
    orin = DeviceFacts(tensorrt="10.3.0.30", compute_capability="8.7", l4t="36.4.3")
    check_compatible(spec, orin)  # same TensorRT release (build number differs), same GPU: accepted
    cases = {
        "no TensorRT": CPU,
        "TensorRT 8.6.2": DeviceFacts(tensorrt="8.6.2", compute_capability="8.7", l4t="35.5.0"),
        "compute capability 7.2": DeviceFacts(tensorrt="10.3.0", compute_capability="7.2"),
        "no GPU answers": DeviceFacts(tensorrt="10.3.0"),
    }
    for phrase, facts in cases.items():
        with pytest.raises(BundleError, match=phrase):
            check_compatible(spec, facts)
    with pytest.raises(BundleError, match="no ONNX Runtime"):
        check_compatible(EngineSpec(kind="onnx", file="model.onnx", precision="fp32"), DeviceFacts())


def test_l4t_release_is_read_from_nv_tegra_release(tmp_path: Path) -> None:
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: ...\n")
    assert l4t_release(f) == "36.4.3"
    assert l4t_release(tmp_path / "absent") is None


def test_downloads_are_size_limited_and_hash_checked(bundles: dict[str, Path], tmp_path: Path) -> None:
    good = bundles["fp32"]
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    with pytest.raises(BundleError, match="limit"):
        fetch(good.as_uri(), digest, tmp_path / "dl", max_bytes=1 << 20)
    with pytest.raises(BundleError, match="sha256"):
        fetch(good.as_uri(), "0" * 64, tmp_path / "dl", max_bytes=1 << 30)
    with pytest.raises(BundleError, match="scheme 'ftp'"):
        fetch("ftp://example.org/x.cellseg", digest, tmp_path / "dl", max_bytes=1 << 30)
    with pytest.raises(BundleError, match=r"scheme 'file' is not allowed .*flash\.allow_file_urls"):
        fetch(good.as_uri(), digest, tmp_path / "dl", max_bytes=1 << 30, schemes=REMOTE_SCHEMES)
    with pytest.raises(BundleError, match="cannot fetch"):
        fetch((tmp_path / "absent.cellseg").as_uri(), digest, tmp_path / "dl", max_bytes=1 << 30)
    assert not (tmp_path / "dl").exists()
    assert fetch(good.as_uri(), digest, tmp_path / "dl", max_bytes=1 << 30).read_bytes() == good.read_bytes()


def test_a_flash_over_mqtt_fetches_local_files_only_when_the_config_allows_it(signing_keys: tuple[Path, Path]) -> None:
    from cellseg.edge.config import parse_config

    base = {"device_id": "scope-1", "model": "m.onnx", "source": {"kind": "folder", "path": "/data/in"},
            "flash": {"trusted_keys": [str(signing_keys[1])]}}  # fmt: skip
    config = parse_config(base)
    assert settings_for(config, CPU).schemes == ("file", "http", "https")  # `cellseg flash` on the device
    assert settings_for(config, CPU, remote=True).schemes == ("http", "https")
    base["flash"]["allow_file_urls"] = True  # type: ignore[index]
    assert "file" in settings_for(parse_config(base), CPU, remote=True).schemes


def test_flash_by_url_removes_its_download_and_a_device_without_keys_refuses_everything(
    bundles: dict[str, Path], signing_keys: tuple[Path, Path], store: SlotStore, tmp_path: Path
) -> None:
    good = bundles["fp32"]
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    result = flash_url(good.as_uri(), digest, store, _settings(signing_keys[1]))
    assert store.active() == result.slot and not list(store.incoming.iterdir())
    no_keys = FlashSettings(trusted_keys=load_trusted_keys([tmp_path / "none"]), max_bytes=1 << 30, facts=CPU)
    with pytest.raises(BundleError, match="trusts no signing keys"):
        flash_file(good, store, no_keys)


def test_rollback_without_a_previous_slot_says_so(store: SlotStore) -> None:
    with pytest.raises(SlotError, match="no previous"):
        store.rollback()


def test_a_damaged_installed_slot_is_refused_at_load(
    bundles: dict[str, Path], signing_keys: tuple[Path, Path], store: SlotStore
) -> None:
    from cellseg.edge.errors import ModelError

    slot = flash_file(bundles["fp32"], store, _settings(signing_keys[1])).slot
    with open(slot / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\0\0\0\0")
    with pytest.raises(ModelError, match="damaged"):
        open_engine(slot)


def test_bench_times_the_engine_the_device_runs(
    bundles: dict[str, Path], signing_keys: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cellseg bench --config`` follows the daemon: the flashed slot (not the configured model),
    the configured thresholds; a slot damaged on disk falls back like the daemon does."""
    import json

    import yaml

    from cellseg.cli import main
    from tests.conftest import SAMPLES

    state = tmp_path / "state"
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "scope-7", "model": str(bundles["fp32"].parent / "missing.onnx"), "state_dir": str(state),
        "source": {"kind": "folder", "path": str(tmp_path)}, "postprocess": {"conf": 0.9},
    }))  # fmt: skip
    store = SlotStore(state / "engines")
    flash_file(bundles["fp32"], store, _settings(signing_keys[1]))
    int8 = flash_file(bundles["int8"], store, _settings(signing_keys[1])).slot
    frame = str(sorted(SAMPLES.glob("*.png"))[0])

    assert main(["bench", frame, "--config", str(config), "--runs", "1", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["precision"] == "int8" and f"from slot {int8.name}" in out.err
    assert report["cells_per_frame"] < 10  # the config's confidence 0.9, not the model's 0.45
    assert report["engine_images_per_s"] > 0 and set(report["stage_ms"]) >= {"preprocess", "infer", "postprocess"}

    # --model takes an installed slot too; both at once is refused.
    assert main(["bench", frame, "--model", str(int8), "--runs", "1", "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cells_per_frame"] > 20
    assert main(["bench", frame, "--model", str(int8), "--config", str(config)]) == 2
    assert "give one" in capsys.readouterr().err

    # The active slot damaged on disk: the previous one (FP32) is timed, as the daemon would run it.
    model_file = int8 / read_slot_manifest(int8).engine.file
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")
    assert main(["bench", frame, "--config", str(config), "--runs", "1", "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"
