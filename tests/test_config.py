"""The YAML schema: validation errors with file:line: key, overrides, numbers, symbols, FuzzConfig.

Most tests need no KVM: they validate configs (and assemble images for
`check_config`). The broken-config corpus in tests/data/broken_configs/
declares each file's expected error on its first line:
`# expect: LINE KEY: message substring`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from minivmm.config import (Config, ConfigError, FuzzConfig, SymbolRef, check_config, load_config,
                            parse_config)

ROOT = Path(__file__).resolve().parent.parent
BROKEN = sorted((ROOT / "tests" / "data" / "broken_configs").glob("*.yaml"))
HELLO = ROOT / "guests" / "hello_long.S"
_EXPECT = re.compile(r"^# expect: (\d+) ([^:]*): (.*)$")


def config_text(body: str) -> str:
    return f"version: 1\nimages:\n  - {{type: asm, source: {HELLO}}}\n{body}"


def error_of(text: str, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path="x.yaml", overrides=overrides)
    return info.value


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_config_reports_file_line_and_key(path: Path) -> None:
    match = _EXPECT.match(path.read_text().splitlines()[0])
    assert match, f"{path.name}: first line must be '# expect: LINE KEY: message'"
    line, key, message = match.groups()
    with pytest.raises(ConfigError) as info:
        check_config(load_config(path))
    text = str(info.value)
    prefix = f"{path}:{line}: {key}: " if key.strip() else f"{path}:{line}: "
    assert text.startswith(prefix), text
    assert message in text, text
    assert info.value.where == f"{path}:{line}"
    assert info.value.key == key.strip()


def test_broken_corpus_is_large_enough() -> None:
    assert len(BROKEN) >= 20


def test_minimal_config_defaults() -> None:
    config = parse_config(config_text(""), path="dir/x.yaml")
    assert isinstance(config, Config)
    assert config.machine.mode == "long" and config.machine.memory == 2 << 20
    assert config.machine.timeout == 10.0 and config.machine.max_exits is None
    assert config.images[0].type == "asm" and config.images[0].path == HELLO
    assert config.devices.serial.output == "stdout" and config.devices.debug_exit.port == 0xF4
    assert config.fuzz is None and config.expect is None
    assert config.name == "x"


@pytest.mark.parametrize("text, value", [("2M", 2 << 20), ("0x200000", 0x200000), ("1G", 1 << 30),
                                         ("4096K", 4 << 20), ("3145728", 3 << 20), ("4MiB", 4 << 20)])
def test_memory_sizes(text: str, value: int) -> None:
    config = parse_config(config_text(f"machine: {{memory: {text}}}"))
    assert config.machine.memory == value


def test_numbers_accept_hex_and_suffixes_everywhere() -> None:
    config = parse_config(config_text(
        "machine: {max_exits: 1K, stack: 0x1f0000, registers: {rax: '0x10', RBX: 4K}}\n"
        "vmcs:\n  io: [{port: '0x80', action: ignore}]\n  msrs: [{msr: 0xc0000080, action: log}]\n"))
    assert config.machine.max_exits == 1024
    assert config.machine.stack == 0x1F0000
    assert config.machine.registers == {"rax": 0x10, "rbx": 4096}
    assert (config.vmcs.io[0].start, config.vmcs.io[0].end) == (0x80, 0x81)
    assert config.vmcs.msrs[0].msr == 0xC0000080


def test_symbols_are_kept_as_references() -> None:
    config = parse_config(config_text("machine: {entry: _start, registers: {rdi: msg}}"))
    assert config.machine.entry == SymbolRef("_start", config.machine.entry.loc)
    assert config.machine.entry.loc.where == "<config>:4"
    assert isinstance(config.machine.registers["rdi"], SymbolRef)


def test_symbols_resolve_against_the_images() -> None:
    config = parse_config(config_text("machine: {entry: _start}\nept:\n  hooks: [{address: msg}]"))
    symbols = check_config(config)
    assert symbols["_start"] == 0x100000 and "msg" in symbols


def test_unknown_key_without_close_match_lists_the_keys() -> None:
    error = error_of(config_text("machine: {zzz: 1}"))
    assert "x.yaml:4: machine.zzz: unknown key; expected one of: name, memory, mode" in str(error)


def test_exception_vectors_by_name_and_number() -> None:
    config = parse_config(config_text('vmcs: {exception_bitmap: ["#UD", UD, gp, 14, "0x3"]}'))
    assert config.vmcs.exception_bitmap == [6, 6, 13, 14, 3]


def test_controls_list_and_mapping() -> None:
    from minivmm.controls import ProcBasedControls
    config = parse_config(config_text("vmcs:\n  controls: {CPU_BASED_HLT_EXITING: true, "
                                      "CPU_BASED_MONITOR_TRAP_FLAG: false}"))
    flags = [(c.flag, c.enabled) for c in config.vmcs.controls]
    assert flags == [(ProcBasedControls.CPU_BASED_HLT_EXITING, True),
                     (ProcBasedControls.CPU_BASED_MONITOR_TRAP_FLAG, False)]


def test_cpuid_strings_are_little_endian_registers() -> None:
    config = parse_config(config_text("vmcs:\n  cpuid: [{leaf: 0x40000000, subleaf: 1, ebx: Mini}]"))
    rule = config.vmcs.cpuid[0]
    assert (rule.leaf, rule.subleaf, rule.ebx) == (0x40000000, 1, int.from_bytes(b"Mini", "little"))
    assert rule.eax is None


def test_perms_forms() -> None:
    config = parse_config(config_text("ept:\n  protect:\n    - {start: 0x100000, size: 4K, perms: rx}\n"
                                      "    - {start: 0x101000, end: 0x102000, perms: r--}"))
    assert [r.perms for r in config.ept.protect] == ["r-x", "r--"]


def test_overrides_replace_and_create_values() -> None:
    text = config_text("machine: {memory: 2M}")
    config = parse_config(text, overrides=["machine.memory=4M", "machine.timeout=0.5",
                                           "images[0].address=0x200000", "devices.serial.output=capture"])
    assert config.machine.memory == 4 << 20
    assert config.machine.timeout == 0.5
    assert config.images[0].address == 0x200000
    assert config.devices.serial.output == "capture"


def test_override_errors_name_the_assignment() -> None:
    error = error_of(config_text(""), overrides=["machine.memory=lots"])
    assert str(error) == ("--set machine.memory=lots: machine.memory: expected a size like 2M or 0x200000, "
                          "got 'lots'")
    assert "expected key=value" in str(error_of(config_text(""), overrides=["machine.memory"]))
    assert "no list item [3]" in str(error_of(config_text(""), overrides=["images[3].address=1"]))


def test_fuzz_section_becomes_fuzz_config() -> None:
    config = parse_config(config_text(
        "fuzz:\n  input_symbol: msg\n  max_input_size: 1K\n  length_register: RSI\n"
        "  crash_vectors: ['#PF', GP]\n  crash_addresses: [0x100010]\n"
        "  coverage_ranges: [[0x100000, 0x100100]]\n  timeout: 0.25\n"))
    assert config.fuzz == FuzzConfig(input_symbol="msg", input_address=None, max_input_size=1024,
                                     length_register="rsi", length_address=None, crash_vectors=[14, 13],
                                     crash_addresses=[0x100010], coverage_ranges=[(0x100000, 0x100100)],
                                     timeout=0.25)


def test_fuzz_needs_an_input_and_one_length() -> None:
    assert "input_symbol' or 'input_address' is missing" in str(error_of(config_text("fuzz: {timeout: 1}")))
    error = error_of(config_text("fuzz: {input_address: 0x1000, length_register: rsi, length_address: 8}"))
    assert "give only one of 'length_register', 'length_address'" in str(error)
    assert "x.yaml:4: fuzz.coverage_ranges[0]: expected a [start, end) pair with start < end" in str(
        error_of(config_text("fuzz: {input_address: 1, coverage_ranges: [[5, 5]]}")))


def test_image_kinds_validate_their_keys() -> None:
    error = error_of(f"version: 1\nimages:\n  - {{type: binary, path: {HELLO}}}\n")
    assert "images[0].address: required key 'address' is missing" in str(error)
    error = error_of(f"version: 1\nimages:\n  - {{type: binary, path: {HELLO}, address: 1, cmdline: x}}\n")
    assert "images[0].cmdline: unknown key" in str(error)
    error = error_of("version: 1\nimage: {type: elf}\n")
    assert "image.path: required key 'path' is missing" in str(error)


def test_single_image_shorthand() -> None:
    config = parse_config(f"version: 1\nimage: {{type: asm, source: {HELLO}}}\n")
    assert len(config.images) == 1
    assert "give only one of 'image', 'images'" in str(error_of(
        f"version: 1\nimage: {{type: asm, source: {HELLO}}}\nimages: []\n"))


def test_expect_block() -> None:
    config = parse_config(config_text("expect: {result: exit, exit_code: 3, console: hi, counters: {a: 2}}"))
    assert (config.expect.result, config.expect.exit_code, config.expect.console) == ("exit", 3, "hi")
    assert config.expect.counters == {"a": 2}


def test_serial_file_output_needs_a_path(tmp_path: Path) -> None:
    assert "devices.serial.path: required key 'path' is missing" in str(
        error_of(config_text("devices: {serial: {output: file}}")))
    config = parse_config(config_text(f"devices: {{serial: {{output: file, path: {tmp_path}/out.txt}}}}"))
    assert config.devices.serial.path == tmp_path / "out.txt"


def test_empty_and_non_mapping_documents() -> None:
    assert "required key 'version' is missing" in str(error_of(""))
    assert "expected a mapping (the config file's top level), got a list" in str(error_of("- 1\n"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("/nonexistent/x.yaml")


@pytest.mark.kvm
def test_build_machine_applies_rules_and_registers(tmp_path: Path) -> None:
    from minivmm.config import build_machine
    out = tmp_path / "console.txt"
    config = parse_config(config_text(
        f"machine: {{registers: {{r15: 0x1234, rdi: msg}}}}\n"
        f"devices: {{serial: {{output: file, path: {out}}}}}\n"))
    with build_machine(config) as machine:
        assert machine.vcpu.r15 == 0x1234
        assert machine.vcpu.rdi == machine.symbols["msg"]
        result = machine.run_config()
    assert result.reason == "exit" and result.exit_code == 0
    assert out.read_text() == "Hello from long mode!\n"


@pytest.mark.kvm
def test_moved_devices_and_stop_rules(tmp_path: Path) -> None:
    from minivmm.config import build_machine
    guest = tmp_path / "moved_devices.S"
    guest.write_text("mov $0x2f8, %dx\nmov $'A', %al\nout %al, %dx\nmov $9, %al\nmov $0x501, %dx\nout %al, %dx\n"
                     "out %al, $0x70\nhlt\n")
    config = parse_config(
        f"version: 1\nimages: [{{type: asm, source: {guest}}}]\n"
        "devices: {serial: {port: 0x2f8, output: capture}, debug_exit: {port: 0x501}}\n")
    with build_machine(config) as machine:
        result = machine.run_config()
    assert (result.reason, result.exit_code, result.console) == ("exit", 9, "A")
    config = parse_config(
        f"version: 1\nimages: [{{type: asm, source: {guest}}}]\n"
        "devices: {serial: {port: 0x2f8, output: capture}, debug_exit: {enabled: false}}\n"
        "vmcs: {io: [{port: 0x70, action: stop, name: rtc}]}\n")
    with build_machine(config) as machine:
        result = machine.run_config()
        assert machine.counters == {"rtc": 1}
    assert result.reason == "stopped" and "rtc: port 0x70" in result.message


@pytest.mark.kvm
def test_msr_and_io_rules_set_exactly_their_bitmap_bits() -> None:
    from minivmm.config import build_machine
    config = parse_config(config_text(
        "vmcs:\n  msrs:\n"
        "    - {msr: 0x174, action: log, write: false}\n"
        "    - {msr: 0xC0000080, action: count, read: false}\n"
        "    - {msr: 0x10, action: allow}\n"
        "  io:\n    - {port: [0x7FFE, 0x8002], action: ignore}\n    - {port: 0xFFFF, action: count}\n"))
    with build_machine(config, capture_console=True) as machine:
        msrs, ports = machine.vmcs.msr_bitmap, machine.vmcs.io_bitmap
        assert [(msr, write) for msr in (0x10, 0x174, 0xC0000080) for write in (False, True)
                if msrs.is_intercepted(msr, write)] == [(0x174, False), (0xC0000080, True)]
        assert [port for port in [*range(0x7FF0, 0x8010), *range(0xFFF0, 0x10000)]
                if ports.is_intercepted(port)] == [0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFF]


@pytest.mark.kvm
def test_execute_hook_stop_rule() -> None:
    from minivmm.config import build_machine
    config = load_config(ROOT / "configs" / "exec_hook_demo.yaml",
                         overrides=["ept.hooks[0].action=stop", "devices.serial.output=capture"])
    with build_machine(config) as machine:
        result = machine.run_config()
        assert machine.counters["tick"] == 1
    assert result.reason == "stopped" and "execution reached" in result.message


@pytest.mark.kvm
def test_mmio_rule_answers_reads(tmp_path: Path) -> None:
    from minivmm.config import build_machine
    guest = tmp_path / "mmio_read.S"
    guest.write_text("mov $0x10000000, %rdi\nmov (%rdi), %eax\nout %al, $0xf4\nhlt\n")
    config = parse_config(f"version: 1\nimages: [{{type: asm, source: {guest}}}]\n"
                          "devices: {mmio: [{start: 0x10000000, end: 0x10001000, action: ignore, value: 0x2a,"
                          " log: true, name: dev}]}\n")
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()
        assert machine.counters == {"dev": 1}
        assert machine.events == ["dev: read at 0x10000000 rip=0x100007"]
    assert (result.reason, result.exit_code) == ("exit", 0x2A)


@pytest.mark.kvm
def test_inject_is_refused_in_user_mode() -> None:
    from minivmm.config import build_machine
    config = parse_config(config_text("machine: {mode: user}\nvmcs:\n  exceptions:\n"
                                      "    - {vector: UD, action: inject}\n"), path="u.yaml")
    with pytest.raises(ConfigError, match=r"^u.yaml:7: vmcs.exceptions\[0\]: 'inject' cannot work in user mode"):
        build_machine(config, capture_console=True)


@pytest.mark.kvm
def test_a_moved_hypercall_port_is_translated_as_vmcall(tmp_path: Path) -> None:
    from minivmm.config import build_machine
    guest = tmp_path / "moved_hypercall.S"
    guest.write_text("mov $7, %eax\nmov $0x500, %dx\nout %al, %dx\nmov %rax, %rbx\n"
                     "mov $8, %eax\nout %al, $0xf5\nmov %rax, %rcx\nmov $0, %al\nout %al, $0xf4\n")
    config = parse_config(
        f"version: 1\nimages: [{{type: asm, source: {guest}}}]\n"
        "devices: {hypercall: {port: 0x500, calls: [{number: 7, action: return, value: 42}]}}\n")
    with build_machine(config) as machine:
        result = machine.run_config()
        assert (result.reason, machine.vcpu.rbx) == ("exit", 42), result
        assert machine.vcpu.rcx == 8            # the old port is plain I/O now: RAX unchanged
        assert result.exits["EXECUTE_VMCALL"] == 1


@pytest.mark.kvm
@pytest.mark.parametrize("rule, message", [
    ("monitors: [{start: 0x180000, size: 8, access: w, action: stop, name: guard}]",
     "guard: write of 0x180000 at rip="),
    ("hooks: [{address: 0x10000e, action: stop, name: reached}]", "reached: execution reached 0x10000e"),
    ("hooks: [{address: 0x10000e, action: stop, hidden: false, name: reached}]",
     "reached: execution reached 0x10000e"),
])
def test_ept_rules_stop_the_run_by_returning_stop(tmp_path: Path, rule: str, message: str) -> None:
    """An EPT callback ends the run with the Stop it returns, like an exit handler."""
    from minivmm.config import build_machine
    guest = tmp_path / "ept_stop.S"
    guest.write_text("mov $0x180000, %rdi\nmovq $1, (%rdi)\nnop\nmov $0, %al\nout %al, $0xf4\n")
    config = parse_config(f"version: 1\nimages: [{{type: asm, source: {guest}}}]\nept: {{{rule}}}\n")
    with build_machine(config) as machine:
        result = machine.run_config()
    assert result.reason == "stopped" and message in result.message, result
