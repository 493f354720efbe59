"""Batch mode (minivmm.fuzz.batch): the same outcomes as per-run mode, many inputs per entry."""
from __future__ import annotations

import json
import random
import struct
import subprocess
import sys

import pytest

from minivmm.config import load_config
from minivmm.fuzz import FuzzError, FuzzTarget, Harness, Status
from minivmm.fuzz.engine import Fuzzer
from minivmm.fuzz.mutator import Mutator

from conftest import CONFIGS, ROOT

BATCH = CONFIGS / "fuzz_batch.yaml"
GUEST = ROOT / "guests" / "fuzz_batch.S"

# One input per behaviour of guests/fuzz_batch.S, with repeats (a behaviour's second run
# must not see the first's writes) and crashes between clean runs.
CORPUS = [b"", b"A", b"B", b"Bx", b"A", b"C", b"A", b"D", b"E\x00", b"E\x05", b"Ghi", b"H", b"I", b"I",
          b"J", b"B", b"F", b"A", b"zz", b"B", b"C", b"J", b"A" * 300, b"A"]


def _outcome_key(o):
    return (o.status, o.reason, o.exit_code, o.crash_site, o.vector, o.cr2, o.new_blocks)


def _harness(batch: int, timeout: float = 0.5, **kwargs) -> Harness:
    return Harness.from_config(load_config(BATCH, overrides=[f"fuzz.timeout={timeout}"]), batch=batch, **kwargs)


@pytest.mark.kvm
@pytest.mark.parametrize("log_capacity", [256, 2])
def test_batch_outcomes_equal_per_run_outcomes(log_capacity, monkeypatch) -> None:
    """The equality corpus: statuses, crash sites, exit codes and new coverage per input (in
    hit order, also when the in-guest coverage log fills and exits take over)."""
    monkeypatch.setattr("minivmm.fuzz.batch.HIT_CAPACITY", log_capacity)
    rng = random.Random(7)
    mutator = Mutator(64, rng)
    corpus = CORPUS + [bytes(rng.choice(b"ABCDEGHIJz\x00\x05") for _ in range(rng.randrange(1, 6)))
                       for _ in range(60)]
    mutated = (mutator.mutate(rng.choice(CORPUS), CORPUS) for _ in range(400))
    corpus += [data for data in mutated if not data.startswith(b"F")][:300]    # one hang is enough
    with _harness(1) as per_run:
        expected = [_outcome_key(o) for o in per_run.run_batch(corpus)]
        assert per_run.batch_runner is None
    with _harness(64) as batched:
        got = [_outcome_key(o) for o in batched.run_batch(corpus)]
        stats = batched.batch_runner.stats
        hits = batched.coverage.hits
    assert got == expected
    # It really ran in batches: far fewer entries than inputs, stops for the crashes.
    assert stats.batches < len(corpus) // 2 and stats.stops >= 4 and stats.inputs > len(corpus) // 2
    assert len(hits) > 20
    assert stats.guest_hits > 0 and (log_capacity > 20 or stats.guest_hits < len(hits))
    statuses = {o[0] for o in expected}
    assert statuses == {Status.OK, Status.CRASH, Status.TIMEOUT}


@pytest.mark.kvm
def test_crash_inside_a_batch_is_the_input_that_crashed() -> None:
    inputs = [b"A", b"A", b"E\x00", b"A", b"zz"]
    with _harness(64) as h:
        h.run_batch([b"A"])                                  # learn the regions first
        outcomes = h.run_batch(inputs)
        assert [o.status for o in outcomes] == [Status.OK, Status.OK, Status.CRASH, Status.OK, Status.OK]
        crash = outcomes[2]
        assert crash.input == b"E\x00" and crash.vector == 0 and crash.reason == "exception"
        assert h.machine.symbol("fuzz_one") < crash.rip < h.machine.symbol("fuzz_coverage_end")
        assert "div" in crash.disassembly.splitlines()[0]
        assert [o.exit_code for o in outcomes] == [1, 1, None, 1, 0]
        assert h.batch_runner.stats.stops == 1
    with _harness(1) as per_run:
        alone = per_run.run(b"E\x00")
    assert (alone.rip, alone.crash_site, alone.disassembly) == (crash.rip, crash.crash_site, crash.disassembly)


@pytest.mark.kvm
def test_a_hang_inside_a_batch_times_out_alone() -> None:
    inputs = [b"A", b"F", b"A", b"B"]
    with _harness(64) as h:
        h.run_batch([b"A", b"B"])
        before = h.batch_runner.stats.timeouts
        outcomes = h.run_batch(inputs)
        assert [o.status for o in outcomes] == [Status.OK, Status.TIMEOUT, Status.OK, Status.OK]
        assert outcomes[1].input == b"F" and outcomes[1].reason == "timeout"
        assert h.batch_runner.stats.timeouts == before + 1
        # The batch shrank; clean batches make it grow again.
        small = h.batch_runner.stats.size
        h.run_batch([b"A"] * 40)
        assert h.batch_runner.stats.size > small


@pytest.mark.kvm
def test_writes_outside_the_declared_regions_widen_them() -> None:
    """'B' increments a counter in .data, 'I' one in a page of its own, 'J' uses 12 KiB of
    stack: each is found in the dirty log, added to the regions, and the batch runs again,
    so every run sees the snapshot's counter (1 and 2, never more)."""
    with _harness(64) as h:
        machine = h.machine
        page = lambda name: machine.symbol(name) & ~0xFFF      # noqa: E731
        outcomes = h.run_batch([b"B", b"B", b"I", b"I", b"J", b"J", b"B"])
        assert [o.exit_code for o in outcomes] == [1, 1, 2, 2, 3, 3, 1]
        widened = {gpa for gpa, _ in h.batch_runner.stats.widened}
        assert {page("counter"), page("far")} <= widened
        rsp = h.snapshot.vcpu.regs.rsp
        assert any(rsp - 0x4000 <= gpa < rsp - 0x1000 for gpa in widened)      # the deep stack pages
        assert h.batch_runner.stats.reruns >= 1
        reruns = h.batch_runner.stats.reruns
        again = h.run_batch([b"B", b"I", b"J"] * 5)
        assert [o.exit_code for o in again] == [1, 2, 3] * 5
        assert h.batch_runner.stats.reruns == reruns                   # nothing new to learn
    # Declared regions given up front are reset without a rerun.
    with Harness.from_config(load_config(BATCH, overrides=[
            f"fuzz.batch_regions=[[{page('counter')}, {page('counter') + 0x1000}]]"])) as h:
        assert [o.exit_code for o in h.run_batch([b"B"] * 5)] == [1] * 5
        assert h.batch_runner.stats.reruns == 0


@pytest.mark.kvm
def test_coverage_is_attributed_to_the_input_that_reached_it() -> None:
    with _harness(64) as h:
        machine = h.machine
        outcomes = h.run_batch([b"A", b"A", b"Ghi", b"A", b"E\x05", b"E\x05"])
        assert h.batch_runner.stats.batches >= 1 and h.batch_runner.stats.per_run == 0
        blocks = [set(o.new_blocks) for o in outcomes]
        g = machine.symbol("fuzz_one")
        assert blocks[1] == set() and blocks[3] == set() and blocks[5] == set()
        assert blocks[0] and blocks[2] and blocks[4]
        assert not blocks[0] & blocks[2] and not blocks[2] & blocks[4]
        assert g in blocks[0]
        assert set().union(*blocks) == h.coverage.hits
        # Taken inside the guest (bp_handler), not by exits; the bytes are back everywhere.
        assert h.batch_runner.stats.guest_hits == len(h.coverage.hits)
        fresh = Harness.from_config(load_config(BATCH), coverage=False)
        try:
            for address in h.coverage.hits:
                original = fresh.machine.memory.read(address, 1)
                assert machine.memory.read(address, 1) == original == h.snapshot.read(address, 1)
        finally:
            fresh.close()


@pytest.mark.kvm
def test_wrapper_coverage_runs_per_run_first(make_machine) -> None:
    """With the FUZZ_ENTRY wrapper inside the coverage ranges, inputs run per-run until both
    of its blocks are hit, so their coverage is found as in per-run mode."""
    m = make_machine("user")
    m.load_asm(GUEST)
    target = FuzzTarget(input_address=m.symbol("input"), length_register="rsi",
                        coverage_ranges=[(m.symbol("_start"), m.symbol("fuzz_coverage_end"))])
    with Harness(m, target, batch=16) as h:
        outcomes = h.run_batch([b"C", b"A", b"A", b"A"])
        assert m.symbol("_start") in outcomes[0].new_blocks
        assert m.symbol("_start") + 5 in outcomes[1].new_blocks       # the wrapper's OUT
        assert h.batch_runner.stats.per_run == 2
        assert [o.status for o in outcomes] == [Status.CRASH, Status.OK, Status.OK, Status.OK]


@pytest.mark.kvm
def test_a_target_without_the_wrapper_is_refused() -> None:
    with pytest.raises(FuzzError, match="FUZZ_ENTRY"):
        Harness.from_config(load_config(CONFIGS / "fuzz_parser.yaml"), batch=8)


@pytest.mark.kvm
@pytest.mark.parametrize("override, message", [
    ("fuzz.batch_regions=[[0x7000000, 0x7001000]]", "not in guest RAM"),
])
def test_bad_batch_settings_are_refused(override, message) -> None:
    with pytest.raises(FuzzError, match=message):
        Harness.from_config(load_config(BATCH, overrides=[override]))


@pytest.mark.kvm
def test_a_batch_area_outside_ram_is_refused(make_machine) -> None:
    m = make_machine("user")
    m.load_asm(GUEST)
    target = FuzzTarget(input_address=m.symbol("input"), length_register="rsi", batch_area=(0x300000, 0x80000))
    with pytest.raises(FuzzError, match="batch area"):
        Harness(m, target, batch=8)


@pytest.mark.kvm
def test_fuzzer_in_batch_mode_finds_the_crashes(tmp_path) -> None:
    with _harness(32, timeout=0.02) as h:
        fuzzer = Fuzzer(h, corpus_dir=tmp_path / "corpus", crashes_dir=tmp_path / "crashes", seed=3)
        fuzzer.add_seeds([b"A", b"zz", b"Cq"])
        stats = fuzzer.run(runs=1500)
        assert stats.runs >= 1500
        assert any(site.startswith("v14-") for site in stats.crash_sites)
        assert (tmp_path / "crashes" / f"crash-{sorted(stats.crash_sites)[0]}").exists()
        assert len(stats.hits) >= 15 and stats.corpus >= 5          # coverage feedback worked
        # Every run went through batches (a crash ends one: this corpus crashes often).
        assert h.batch_runner.stats.inputs + h.batch_runner.stats.per_run >= stats.runs
        assert h.batch_runner.stats.batches < stats.runs * 3 // 4


@pytest.mark.kvm
def test_cli_batch_option(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "minivmm", "fuzz", str(BATCH), "--corpus", str(tmp_path / "c"),
                           "--crashes", str(tmp_path / "x"), "--runs", "2000", "--seed", "1", "--batch", "16",
                           "--set", "fuzz.timeout=0.02",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["runs"] >= 2000 and summary["crashes"] >= 1
    assert "batch mode: " in done.stderr and "written outside the declared regions" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "minivmm", "fuzz", str(BATCH), "--corpus", str(tmp_path / "c"),
                          "--crashes", str(tmp_path / "x"), "--batch", "5000"], capture_output=True, text=True)
    assert bad.returncode == 2 and "batch size" in bad.stderr


@pytest.mark.kvm
def test_a_write_into_the_batch_area_falls_back_to_per_run() -> None:
    """'KW' writes where the input says; aimed at the runtime's code it would break the batch,
    so the batch runs again per-run and batch mode stops for this harness."""
    with _harness(1) as per_run:
        base = None
        with _harness(64) as h:
            base = h.batch_runner.base
        aim = b"KW" + struct.pack("<I", base + 0x40)
        inputs = [b"A", aim, b"A", b"B", b"C", b"A"]
        warm_up = [b"A", b"KW" + struct.pack("<I", 0x180000)]          # free RAM outside the area: fine
        per_run.run_batch(warm_up)
        expected = [_outcome_key(o) for o in per_run.run_batch(inputs)]
    with _harness(64) as h:
        h.run_batch(warm_up)
        assert not h.batch_runner.stats.disabled
        got = [_outcome_key(o) for o in h.run_batch(inputs)]
        assert "batch area" in h.batch_runner.stats.disabled
        assert got == expected
        assert [o.exit_code for o in h.run_batch([b"A", b"KW" + struct.pack("<I", base + 0x40)])] == [1, 4]


@pytest.mark.parametrize("value, message", [("0", "positive integer"), ("2000", "batch size from 1 to 1024"),
                                            ("[1]", "positive integer")])
def test_config_batch_size_is_checked(tmp_path, value, message) -> None:
    from minivmm.config import ConfigError
    text = BATCH.read_text().replace("batch: 64", f"batch: {value}")
    path = tmp_path / "fuzz_batch.yaml"
    path.write_text(text.replace("../guests/", f"{ROOT}/guests/"))
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "fuzz.batch" in str(caught.value) and f"{path}:" in str(caught.value)


@pytest.mark.kvm
def test_an_images_zero_fill_is_declared_up_front(make_machine) -> None:
    m = make_machine("user")
    m.load_asm(GUEST)
    m.place(0x180000, bytes(0x2000), name="scratch", bss=0x2000)         # an ELF-style bss
    target = FuzzTarget(input_address=m.symbol("input"), length_register="rsi")
    with Harness(m, target, batch=8) as h:
        declared = [(gpa, gpa + length) for gpa, _, length in h.batch_runner.regions]
        assert any(start <= 0x180000 and 0x182000 <= end for start, end in declared)
        outcomes = h.run_batch([b"KW" + struct.pack("<I", 0x181000)] * 3)
        assert [o.exit_code for o in outcomes] == [4, 4, 4]
        assert h.batch_runner.stats.reruns == 0 and not h.batch_runner.stats.widened
