"""`minivmm afl-fuzz`: afl-fuzz on the bridge without hand-set AFL_SKIP_BIN_CHECK, -M/-S included."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from minivmm.fuzz.afl import (AflError, afl_fuzz_command, afl_fuzz_environment,
                              split_afl_fuzz_arguments)

from conftest import CONFIGS, ROOT

PARSER = CONFIGS / "fuzz_parser.yaml"


def test_arguments_split_at_the_double_dash() -> None:
    afl, target = split_afl_fuzz_arguments(["-i", "in", "-o", "out", "--", "c.yaml", "--timeout", "1", "@@"])
    assert (afl, target) == (["-i", "in", "-o", "out"], ["c.yaml", "--timeout", "1", "@@"])
    assert afl_fuzz_command("afl-fuzz", afl, target)[5:9] == ["--", sys.executable, "-m", "minivmm"]
    for bad in (["-i", "in"], ["-i", "in", "--"]):
        with pytest.raises(AflError):
            split_afl_fuzz_arguments(bad)


def test_environment_keeps_what_the_user_set() -> None:
    env = afl_fuzz_environment({"AFL_FORKSRV_INIT_TMOUT": "5000"})
    assert env == {"AFL_SKIP_BIN_CHECK": "1", "AFL_FORKSRV_INIT_TMOUT": "5000"}


def test_usage_errors_are_status_2() -> None:
    from minivmm.cli import main
    assert main(["afl-fuzz", "-i", "seeds"]) == 2
    assert main(["afl-fuzz"]) == 2
    assert main(["afl-fuzz", "--help"]) == 0


def _stats(path) -> dict[str, str]:
    lines = (path / "fuzzer_stats").read_text().splitlines()
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


@pytest.mark.kvm
@pytest.mark.slow
def test_main_and_secondary_share_one_output_folder(tmp_path) -> None:
    if shutil.which("afl-fuzz") is None:
        pytest.skip("afl-fuzz is not installed (apt-get install -y afl++)")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "sum").write_bytes(b"FUZZ\x01hello")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "AFL_SKIP_BIN_CHECK"}
    env.update(PYTHONPATH=str(ROOT), AFL_NO_UI="1", AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1",
               AFL_SKIP_CPUFREQ="1", AFL_NO_AFFINITY="1")
    command = [sys.executable, "-m", "minivmm", "afl-fuzz", "-i", str(seeds), "-o", str(out), "-V", "6",
               "-t", "1000"]
    instances = {name: subprocess.Popen(command + [flag, name, "--", str(PARSER)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for flag, name in (("-M", "main"), ("-S", "s1"))}
    logs = {name: proc.communicate(timeout=90)[0] for name, proc in instances.items()}
    for name, proc in instances.items():
        assert proc.returncode == 0, logs[name][-3000:]
        stats = _stats(out / name)
        assert int(stats["execs_done"]) > 100, stats
        assert f" {name} " in stats["command_line"], stats
        assert (out / name / ".synced").is_dir()          # both took part in the sync of `out`
