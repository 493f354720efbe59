"""Snapshot fuzzing: harness, breakpoint coverage, mutator, fuzz loop and AFL++ bridge.

    from minivmm.config import load_config
    from minivmm.fuzz import Harness
    from minivmm.fuzz.engine import Fuzzer

    with Harness.from_config(load_config("configs/fuzz_parser.yaml")) as harness:
        print(harness.run(b"FUZZ\x02\x00\x80A").summary())      # crash: #PF ...
        stats = Fuzzer(harness, corpus_dir="corpus", crashes_dir="crashes").run(seconds=10)

* `Harness` / `FuzzTarget` / `RunOutcome` (`minivmm.fuzz.harness`): place an
  input, run from a snapshot with a deadline, classify the run.
* batch mode (`minivmm.fuzz.batch`, `Harness(..., batch=N).run_batch`): many inputs per
  guest entry through a CPL-3 runtime in the guest, outcomes as per run.
* `Coverage` (`minivmm.fuzz.coverage`): one-shot int3 breakpoints on basic blocks.
* `Mutator` (`minivmm.fuzz.mutator`): havoc-style mutations over a corpus.
* `Fuzzer` (`minivmm.fuzz.engine`): the fuzz loop behind `minivmm fuzz`.
* `minivmm.fuzz.afl`: AFL++ forkserver bridge behind `minivmm afl`.
"""
from __future__ import annotations

from ..lazy import lazy_names

# Loaded on first use, so `minivmm.fuzz.cli` (which the CLI imports to list its commands) does
# not load the harness.
__getattr__ = lazy_names(__name__, {
    "Coverage": ".coverage", "CoverageError": ".coverage", "basic_blocks": ".coverage",
    "FuzzError": ".harness", "FuzzTarget": ".harness", "Harness": ".harness", "RunOutcome": ".harness",
    "Status": ".harness"})


__all__ = ["Coverage", "CoverageError", "basic_blocks", "FuzzError", "FuzzTarget", "Harness",
           "RunOutcome", "Status"]
