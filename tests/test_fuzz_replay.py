"""`minivmm fuzz --json` and replaying its crashes with `minivmm run CONFIG --input FILE`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minivmm.config import build_machine, load_config
from minivmm.fuzz import Harness
from minivmm.fuzz.harness import FuzzTarget, place_input

from conftest import CONFIGS, ROOT

PARSER = CONFIGS / "fuzz_parser.yaml"
pytestmark = pytest.mark.kvm


def minivmm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_place_input_matches_the_harness() -> None:
    """The guest state after place_input is the harness's after prepare: registers and buffer."""
    config = load_config(PARSER)
    data = b"FUZZ\x02\x00\x80A" + bytes(range(40))
    with Harness.from_config(config, coverage=False) as harness:
        harness.prepare(data)
        expected = (bytes(harness.machine.vcpu.regs),
                    harness.machine.memory.read(harness.target.input_address, 4096))
    with build_machine(config, capture_console=True) as machine:
        placed = place_input(machine, FuzzTarget.from_config(config, machine), data)
        got = (bytes(machine.vcpu.regs), machine.memory.read(FuzzTarget.from_config(config, machine).input_address,
                                                             4096))
    assert placed == data and got == expected


def test_fuzz_json_then_replay_the_crash_with_trace(tmp_path) -> None:
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    corpus.mkdir()
    (corpus / "seed").write_bytes(b"FUZZ\x02hello")
    done = minivmm("fuzz", str(PARSER), "--corpus", str(corpus), "--crashes", str(crashes),
                   "--runs", "20000", "--seed", "1", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["runs"] == 20000 and summary["crashes"] >= 1, summary
    assert {"elapsed_s", "runs_per_s", "blocks_hit", "blocks", "timeouts"} <= summary.keys()
    site, path = sorted(summary["crash_sites"].items())[0]
    vector, rip = site.split("-")
    replay = minivmm("run", str(PARSER), "--input", path, "--trace", "--json")
    assert replay.returncode == 125, replay.stderr
    report = json.loads(replay.stdout)
    assert report["reason"] == "exception" and report["exception"]["vector"] == int(vector[1:])
    assert report["exception"]["rip"] == int(rip, 16)
    assert report["trace"] and "EXCEPTION_OR_NMI" in report["trace"][-1]
    text = minivmm("run", str(PARSER), "--input", path, "--trace")
    assert text.returncode == 125 and "minivmm: exit EXCEPTION_OR_NMI" in text.stderr


def test_replay_of_a_benign_input_exits_cleanly(tmp_path) -> None:
    benign = tmp_path / "ok"
    benign.write_bytes(b"FUZZ\x01abc")
    assert minivmm("run", str(PARSER), "--input", str(benign)).returncode == 0


def test_input_needs_a_fuzz_section_and_a_readable_file(tmp_path) -> None:
    benign = tmp_path / "ok"
    benign.write_bytes(b"x")
    done = minivmm("run", str(CONFIGS / "hello_long.yaml"), "--input", str(benign))
    assert done.returncode == 2 and "fuzz" in done.stderr
    done = minivmm("run", str(PARSER), "--input", str(tmp_path / "missing"))
    assert done.returncode == 2 and "--input" in done.stderr
