"""The fuzz harness, breakpoint coverage, mutator, fuzz loop and `minivmm fuzz`."""
from __future__ import annotations

import random

import pytest

from minivmm.fuzz import FuzzTarget, Harness, Status, basic_blocks
from minivmm.fuzz.coverage import INT3, CoverageError, comparison_constants, symbol_ranges
from minivmm.fuzz.engine import Fuzzer
from minivmm.fuzz.mutator import Mutator

from conftest import CONFIGS

PARSER = CONFIGS / "fuzz_parser.yaml"

# test rsi,rsi; jz +2; inc eax; ret; cmp al, 0x46; cmp eax, 0x5a5a5546
CODE = bytes.fromhex("4885f6" "7402" "ffc0" "c3" "3c46" "3d4655 5a5a".replace(" ", ""))

# A user-mode target with one behaviour per first input byte.
TARGET = r"""
.include "minivmm.inc"
.globl _start, input, start_cov, end_cov, boom
_start:
start_cov:
    movzbl input(%rip), %eax
    test %rsi, %rsi
    jz ok
    cmp $'L', %al
    je hang
    cmp $'U', %al
    je undefined
    cmp $'C', %al
    je boom
    cmp $'E', %al
    je bad_exit
ok:
    EXIT 0
hang:
    jmp hang
undefined:
    ud2
boom:
    nop
    EXIT 0
bad_exit:
    EXIT 3
end_cov:
.data
.balign 4096
input: .fill 64, 1, 0
"""


def test_basic_blocks_and_constants_from_capstone() -> None:
    assert basic_blocks(CODE, 0x1000) == [0x1000, 0x1005, 0x1007, 0x1008]
    assert comparison_constants(CODE, 0x1000) == [b"\x46", b"\x46\x55\x5a\x5a"]


def test_symbol_ranges_end_at_the_next_symbol() -> None:
    symbols = {"main": 0x1000, "helper": 0x1040, "data": 0x2000}
    assert symbol_ranges(symbols, ["main", "helper"]) == [(0x1000, 0x1040), (0x1040, 0x2000)]
    with pytest.raises(CoverageError, match="last symbol"):
        symbol_ranges(symbols, ["data"])
    with pytest.raises(CoverageError, match="no symbol"):
        symbol_ranges(symbols, ["nope"])


def test_mutator_stays_within_the_size_limit_and_is_reproducible() -> None:
    corpus = [b"FUZZ\x01abc", b"", bytes(range(64))]
    a = Mutator(32, random.Random(7), dictionary=[b"FUZZ"])
    b = Mutator(32, random.Random(7), dictionary=[b"FUZZ"])
    outputs = [a.mutate(corpus[i % 3], corpus) for i in range(2000)]
    assert outputs == [b.mutate(corpus[i % 3], corpus) for i in range(2000)]
    assert all(len(o) <= 32 for o in outputs)
    assert len(set(outputs)) > 1500
    assert any(b"FUZZ" in o for o in outputs[1::3])


def _target_harness(make_machine, **kwargs) -> Harness:
    m = make_machine("user", "2M")
    m.load_asm(TARGET)
    target = FuzzTarget(input_address=m.symbol("input"), max_input_size=64, length_register="rsi",
                        crash_addresses=(m.symbol("boom"),), crash_exit_codes=frozenset({3}),
                        coverage_ranges=[(m.symbol("start_cov"), m.symbol("end_cov"))], timeout=0.3)
    return Harness(m, target, **kwargs)


@pytest.mark.kvm
def test_runs_are_classified(make_machine) -> None:
    harness = _target_harness(make_machine)
    ok = harness.run(b"A")
    assert (ok.status, ok.reason, ok.exit_code) == (Status.OK, "exit", 0)

    ud = harness.run(b"U")
    assert (ud.status, ud.reason, ud.vector) == (Status.CRASH, "exception", 6)
    assert ud.rip == harness.machine.symbol("undefined")
    assert "ud2" in ud.disassembly and ud.crash_site == f"v6-{ud.rip:x}"
    assert "int3" not in ud.disassembly                 # pending breakpoints shown as the original code
    assert ud.input == b"U"

    boom = harness.run(b"C")
    assert (boom.status, boom.reason, boom.rip) == (Status.CRASH, "crash_address", harness.machine.symbol("boom"))

    bad = harness.run(b"E")
    assert (bad.status, bad.exit_code) == (Status.CRASH, 3)

    hang = harness.run(b"L")
    assert (hang.status, hang.reason) == (Status.TIMEOUT, "timeout")

    again = harness.run(b"A")                  # the snapshot is intact after all of that
    assert (again.status, again.exit_code) == (Status.OK, 0)
    assert harness.run(b"C").reason == "crash_address"   # crash breakpoints stay


@pytest.mark.kvm
def test_breakpoints_fire_once_and_are_removed_from_the_snapshot_too(make_machine) -> None:
    harness = _target_harness(make_machine)
    cov = harness.coverage
    memory = harness.machine.memory
    assert len(cov.blocks) >= 8
    assert all(memory.read_u8(b) == INT3 for b in cov.blocks)
    first = harness.run(b"A")
    assert first.new_blocks and first.new_blocks[0] == harness.machine.symbol("_start")
    for block in first.new_blocks:
        assert memory.read_u8(block) != INT3
        assert harness.snapshot.read(block, 1) != bytes([INT3])
    assert harness.run(b"A").new_blocks == ()          # nothing new: no breakpoint exits
    assert harness.run(b"U").new_blocks                # the ud2 path is new
    assert cov.hits >= set(first.new_blocks)
    bitmap = cov.bitmap(256)
    assert sum(bitmap) >= 1 and len(bitmap) == 256


@pytest.mark.kvm
def test_fast_path_matches_machine_run(make_machine) -> None:
    fast = _target_harness(make_machine)
    slow = _target_harness(make_machine, fast=False)
    for data in (b"", b"A", b"U", b"C", b"E", b"L", b"A"):
        a, b = fast.run(data), slow.run(data)
        assert (a.status, a.reason, a.rip, a.vector, a.exit_code, a.new_blocks) == \
               (b.status, b.reason, b.rip, b.vector, b.exit_code, b.new_blocks), data


@pytest.mark.kvm
def test_the_c_cycle_runs_as_the_python_path() -> None:
    """Per-run outcomes through fastpath.FuzzCycle equal those of the Python path (serial
    output, an exit from inside the target, crashes, a hang, data and stack writes, long
    inputs then short ones), and the C cycle really ran them."""
    from minivmm import fastpath
    from minivmm.config import load_config
    config = CONFIGS / "fuzz_batch.yaml"
    corpus = [b"A", b"Ghi", b"H", b"B", b"B", b"C", b"F", b"J", b"I", b"A" * 200, b"E\x00", b"", b"Gxyz", b"A"]
    outcomes = {}
    for fast in (True, False):
        with Harness.from_config(load_config(config, overrides=["fuzz.timeout=0.5"]), batch=1, fast=fast) as h:
            outcomes[fast] = [(o.status, o.reason, o.rip, o.vector, o.cr2, o.exit_code, o.new_blocks,
                               bytes(h.machine.serial.output)) for o in map(h.run, corpus)]
            if fast and fastpath.COMPILED:
                assert h.cycle_runs >= len(corpus) // 2       # the run after a crash takes the Python path
    assert outcomes[True] == outcomes[False]
    assert outcomes[True][1][-1] == b"hi" and outcomes[True][-2][-1] == b"xyz" and outcomes[True][-1][-1] == b""


@pytest.mark.kvm
def test_input_placement_restores_leftovers_and_length_in_memory(make_machine) -> None:
    m = make_machine("user", "2M")
    m.load_asm(r"""
.include "minivmm.inc"
.globl _start, input, length
_start:
    mov length(%rip), %rcx
    lea input(%rip), %rsi
    xor %eax, %eax
1:  test %rcx, %rcx
    jz 2f
    add (%rsi), %al
    inc %rsi
    dec %rcx
    jmp 1b
2:  outb %al, $DEBUG_EXIT_PORT
.data
length: .quad 0
input: .fill 16, 1, 0
""")
    harness = Harness(m, FuzzTarget(input_address=m.symbol("input"), max_input_size=16,
                                    length_address=m.symbol("length"), length_size=8))
    assert harness.run(b"\x01\x02\x03").exit_code == 6
    assert harness.run(b"\x05").exit_code == 5
    assert m.memory.read(m.symbol("input"), 4) == b"\x05\x00\x00\x00"    # leftovers cleared
    assert harness.run(bytes(range(40))).input == bytes(range(16))        # cut to the maximum
    assert harness.run(b"\x07").exit_code == 7 and harness.run(b"").exit_code == 0


@pytest.mark.kvm
def test_planted_bug_needs_coverage(tmp_path) -> None:
    from minivmm.config import load_config
    budget = 20_000
    config = load_config(PARSER)
    with Harness.from_config(config, coverage=True) as harness:
        fuzzer = Fuzzer(harness, corpus_dir=tmp_path / "corpus", crashes_dir=tmp_path / "crashes", seed=2)
        stats = fuzzer.run(runs=budget, until_crash=True)
        assert stats.crashes == 1, stats.line()
        assert stats.runs < budget
        outcome = next(iter(fuzzer.crashes.values()))
        assert outcome.vector == 14 and outcome.input.startswith(b"FUZZ\x02")
        assert outcome.cr2 >= 1 << 63                  # the negative slot's address
        assert (tmp_path / "crashes" / f"crash-{outcome.crash_site}").read_bytes() == outcome.input
        assert len(list((tmp_path / "corpus").iterdir())) >= 5
    with Harness.from_config(config, coverage=False) as blind:
        stats = Fuzzer(blind, seed=2).run(runs=budget, until_crash=True)
        assert stats.crashes == 0 and stats.runs == budget


@pytest.mark.kvm
def test_fuzz_command_saves_each_crash_site_once(tmp_path, capsys) -> None:
    from minivmm.cli import main
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    corpus.mkdir()
    (corpus / "seed").write_bytes(b"FUZZ\x01hello")
    status = main(["fuzz", str(PARSER), "--corpus", str(corpus), "--crashes", str(crashes),
                   "--runs", "15000", "--seed", "1"])
    out, err = capsys.readouterr()
    assert status == 0
    assert "runs" in err and "coverage" in err and "crashes" in err      # the status line
    saved = sorted(p.name for p in crashes.iterdir())
    assert saved == ["crash-v14-1000d3", "crash-v14-1000d3.txt"], (saved, out)
    assert "#PF" in (crashes / "crash-v14-1000d3.txt").read_text()
    assert "1 unique crashes" in out


@pytest.mark.kvm
def test_fuzz_command_with_jobs(tmp_path, capsys) -> None:
    from minivmm.cli import main
    status = main(["fuzz", str(PARSER), "--corpus", str(tmp_path / "c"), "--crashes", str(tmp_path / "k"),
                   "--runs", "3000", "--jobs", "2", "--seed", "3"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert out.startswith("3000 runs"), out
    assert len(list((tmp_path / "c").iterdir())) >= 2


def test_fuzz_command_rejects_a_config_without_fuzz_section(tmp_path, capsys) -> None:
    from minivmm.cli import main
    config = tmp_path / "plain.yaml"
    config.write_text("version: 1\nmachine: {mode: user}\nimages:\n  - {type: asm, source: x.S}\n")
    (tmp_path / "x.S").write_text(".globl _start\n_start: hlt\n")
    status = main(["fuzz", str(config), "--corpus", str(tmp_path / "c"), "--crashes", str(tmp_path / "k")])
    assert status == 2
    assert "no `fuzz:` section" in capsys.readouterr().err
