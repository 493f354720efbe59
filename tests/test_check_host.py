"""`minivmm check` finds what `run` would fail on, with the key named: images that overlap
each other or minivmm's system area, overlapping RAM windows, a console file in a missing
folder, guest RAM the host cannot reserve; and `run` reports the same errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import GUESTS
from minivmm import cli
from minivmm.config import ConfigError, build_machine, check_config, load_config


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text("version: 1\n" + text)
    return path


def check_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_config(load_config(path))
    return info.value


def same_error_from_run(path: Path, capsys) -> str:
    """The CLI's check and run messages for `path` (they must be equal, but for the host's free
    memory, which moves between the two calls); returns it."""
    assert cli.main(["check", str(path)]) == 2
    checked = capsys.readouterr().err
    assert cli.main(["run", str(path)]) == 2
    assert _steady(capsys.readouterr().err) == _steady(checked)
    return checked


def _steady(message: str) -> str:
    return re.sub(r"the host has about \d+ MiB", "the host has about N MiB", message)


HELLO = GUESTS / "hello_long.S"


def test_overlapping_images_name_both(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"""machine: {{mode: long}}
images:
  - {{type: asm, source: {HELLO}}}
  - {{type: asm, source: {HELLO}, address: 0x100010}}
""")
    error = check_error(path)
    assert error.key == "images[1]"
    assert "images[1] (hello_long.S) [0x100010," in str(error)
    assert "overlaps images[0] (hello_long.S) [0x100000," in str(error)
    same_error_from_run(path, capsys)


def test_image_over_the_user_mode_system_area(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"""machine: {{mode: user}}
images:
  - {{type: asm, source: {HELLO}, address: 0x2000}}
""")
    error = check_error(path)
    assert error.key == "images[0]"
    assert "images[0] (hello_long.S) [0x2000," in str(error) and "minivmm's IDT" in str(error)
    same_error_from_run(path, capsys)


@pytest.mark.kvm
def test_low_long_mode_image_moves_the_system_area(tmp_path: Path) -> None:
    path = write(tmp_path, f"""machine: {{mode: long}}
images:
  - {{type: asm, source: {HELLO}, address: 0x3000}}
expect: {{result: exit, exit_code: 0}}
""")
    check_config(load_config(path))
    with build_machine(load_config(path), capture_console=True) as machine:
        result = machine.run_config()
        assert (result.reason, result.exit_code) == ("exit", 0)
        assert machine.system_base == 0x10000


def test_overlapping_ram_windows(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"""machine: {{mode: long}}
images: [{{type: asm, source: {HELLO}}}]
platform:
  ram_windows:
    - {{start: 0x40000000, size: 1M, name: a}}
    - {{start: 0x40080000, size: 1M, name: b}}
""")
    error = check_error(path)
    assert error.key == "platform.ram_windows[1]"
    assert "RAM window b [0x40080000, 0x40180000) overlaps RAM window a [0x40000000, 0x40100000)" in str(error)
    same_error_from_run(path, capsys)


def test_ram_window_over_machine_memory(tmp_path: Path) -> None:
    path = write(tmp_path, f"""machine: {{mode: long, memory: 4M}}
images: [{{type: asm, source: {HELLO}}}]
platform: {{ram_windows: [{{start: 0x200000, size: 1M, name: low}}]}}
""")
    error = check_error(path)
    assert error.key == "platform.ram_windows[0]" and "machine.memory" in str(error)


def test_console_file_in_a_missing_folder(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"""machine: {{mode: long}}
images: [{{type: asm, source: {HELLO}}}]
devices: {{serial: {{output: file, path: no/such/dir/console.txt}}}}
""")
    error = check_error(path)
    assert error.key == "devices.serial.path"
    assert "folder" in str(error) and "does not exist" in str(error)
    same_error_from_run(path, capsys)


def test_memory_the_host_cannot_reserve(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"""machine: {{mode: long, memory: 60G}}
images: [{{type: asm, source: {HELLO}}}]
""")
    error = check_error(path)
    assert error.key == "machine.memory"
    assert "cannot reserve" in str(error)
    same_error_from_run(path, capsys)


def test_host_limits_name_the_file_line_and_key(tmp_path: Path, capsys) -> None:
    """Guest RAM the host cannot give is reported at the line that asked for it: machine.memory,
    or the RAM window that pushed the total over."""
    path = write(tmp_path, f"""machine: {{mode: long,
  memory: 60G}}
images: [{{type: asm, source: {HELLO}}}]
""")
    assert f"{path}:3: machine.memory: the host cannot reserve" in same_error_from_run(path, capsys)
    path = write(tmp_path, f"""images: [{{type: asm, source: {HELLO}}}]
platform:
  ram_windows:
    - {{start: 0x100000000, size: 60G}}
""", "w.yaml")
    assert f"{path}:5: platform.ram_windows[0]: the host cannot reserve" in same_error_from_run(path, capsys)


def test_an_entry_point_outside_guest_ram_is_a_config_error(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"""machine: {{mode: long,
  entry: 0xffffffffffffffff}}
images: [{{type: asm, source: {HELLO}}}]
""")
    message = same_error_from_run(path, capsys)
    assert f"{path}:3: machine.entry: the entry point 0xffffffffffffffff is outside guest RAM" in message


def test_a_control_the_host_cannot_honour_fails_check_as_it_fails_run(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, f"""machine: {{mode: long}}
images: [{{type: asm, source: {HELLO}}}]
vmcs:
  controls: [CPU_BASED_HLT_EXITING, CPU_BASED_RDTSC_EXITING]
""")
    message = same_error_from_run(path, capsys)
    assert f"{path}:5: vmcs.controls[1]: this host cannot honour CPU_BASED_RDTSC_EXITING" in message
