"""The config tree cache: a file loaded before is validated from its stored tree, without PyYAML,
only while its text is unchanged; what the validation says is the same either way."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm.config import ConfigError, load_config
from minivmm.config import treecache

CONFIG = """\
version: 1
machine: {memory: 4M, mode: protected, registers: {rax: 0x1234}}
images:
  - {type: binary, path: guest.bin, address: 0x1000}   # a comment
devices:
  serial: &serial {port: 0x2f8}
expect: {result: exit, exit_code: 3, console: "héllo"}
vmcs: {exception_bitmap: ["#UD", 14]}
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MINIVMM_CACHE_DIR", str(tmp_path / "cache" / "asm"))
    monkeypatch.delenv(treecache.CACHE_ENV, raising=False)
    (tmp_path / "guest.bin").write_bytes(b"\xf4")
    path = tmp_path / "guest.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_a_second_load_comes_from_the_cache_and_validates_the_same(config: Path) -> None:
    first = load_config(config)
    assert treecache.entry(str(config)).is_file()
    assert treecache.load(CONFIG, str(config)) is not None
    assert load_config(config) == first


def test_the_cached_load_imports_no_yaml(config: Path) -> None:
    code = ("import sys; from minivmm.config import load_config; c = load_config(sys.argv[1]); "
            "print('yaml' in sys.modules, c.machine.memory, c.expect.console)")
    run = lambda: subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True,
                                 env=os.environ, timeout=60)
    assert run().stdout.split() == ["True", str(4 << 20), "héllo"]
    assert run().stdout.split() == ["False", str(4 << 20), "héllo"]


def test_a_changed_text_is_parsed_again(config: Path) -> None:
    load_config(config)
    config.write_text(CONFIG.replace("4M", "8M"), encoding="utf-8")
    assert treecache.load(config.read_text(encoding="utf-8"), str(config)) is None
    assert load_config(config).machine.memory == 8 << 20
    assert load_config(config).machine.memory == 8 << 20


def test_overrides_are_not_stored(config: Path) -> None:
    assert load_config(config, ["machine.memory=16M"]).machine.memory == 16 << 20
    assert load_config(config).machine.memory == 4 << 20


def test_a_damaged_entry_is_a_miss(config: Path) -> None:
    first = load_config(config)
    entry = treecache.entry(str(config))
    for damage in (b"", b"\x00garbage", entry.read_bytes()[:-7]):
        entry.write_bytes(damage)
        assert treecache.load(CONFIG, str(config)) is None
        assert load_config(config) == first


def test_errors_name_the_same_line_from_the_cache(config: Path) -> None:
    config.write_text(CONFIG.replace("mode: protected", "mode: protectd"), encoding="utf-8")
    messages = []
    for _ in range(2):
        with pytest.raises(ConfigError) as error:
            load_config(config)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and f"{config}:2: machine.mode:" in messages[0], messages


def test_the_cache_can_be_turned_off(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(treecache.CACHE_ENV, "0")
    load_config(config)
    assert not treecache.entry(str(config)).exists()


def test_the_cache_stays_small(config: Path) -> None:
    big = config.with_name("big.yaml")
    big.write_text(CONFIG + "#" * treecache.MAX_TEXT + "\n", encoding="utf-8")
    assert load_config(big).machine.memory == 4 << 20
    assert not treecache.entry(str(big)).exists()
    for index in range(3 * treecache.SLOTS):
        other = config.with_name(f"guest{index}.yaml")
        other.write_text(CONFIG, encoding="utf-8")
        load_config(other)
    assert len(list(treecache.entry(str(config)).parent.iterdir())) <= treecache.SLOTS
