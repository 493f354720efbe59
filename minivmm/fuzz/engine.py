"""The fuzz loop behind `minivmm fuzz`: corpus, mutation, crash triage, status, jobs.

One `Fuzzer` drives one `Harness` (one machine). An input that reaches a
new basic block joins the corpus (and the corpus directory); a crash is
saved once per crash site (vector + RIP, or reason + RIP) as
`crashes/crash-<site>` with a `.txt` beside it describing the run.
`fuzz_jobs` runs several fuzzers in local processes (each its own machine),
sharing the corpus directory: every job picks up the inputs the others
saved, every couple of seconds.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

from .harness import Harness, RunOutcome, Status
from .mutator import Mutator

SYNC_INTERVAL_S = 2.0
STATUS_INTERVAL_S = 0.5


@dataclass
class FuzzStats:
    """Counters of a campaign (one job, or all jobs summed)."""
    runs: int = 0
    crash_runs: int = 0
    timeouts: int = 0
    corpus: int = 0
    elapsed_s: float = 0.0
    crash_sites: set[str] = field(default_factory=set)
    hits: set[int] = field(default_factory=set)
    blocks: int = 0
    first_crash_run: int | None = None

    @property
    def crashes(self) -> int:
        """Unique crashes (distinct crash sites)."""
        return len(self.crash_sites)

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        cov = f"{len(self.hits)}/{self.blocks}" if self.blocks else "off"
        return (f"runs {self.runs} ({self.runs_per_s:,.0f}/s)  coverage {cov}  corpus {self.corpus}  "
                f"crashes {self.crashes} ({self.crash_runs} runs)  timeouts {self.timeouts}  "
                f"elapsed {self.elapsed_s:.1f}s")


class Fuzzer:
    """Coverage-guided mutation fuzzing of one harness."""

    def __init__(self, harness: Harness, *, corpus_dir: str | os.PathLike | None = None,
                 crashes_dir: str | os.PathLike | None = None, seed: int | None = None,
                 status: Callable[[FuzzStats], None] | None = None) -> None:
        self.harness = harness
        self.corpus_dir = Path(corpus_dir) if corpus_dir is not None else None
        self.crashes_dir = Path(crashes_dir) if crashes_dir is not None else None
        for d in (self.corpus_dir, self.crashes_dir):
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.mutator = Mutator(harness.target.max_input_size, self.rng,
                               dictionary=list(harness.coverage.constants))
        self.corpus: list[bytes] = []
        self._known: set[bytes] = set()
        self._seen_files: set[str] = set()
        self.crashes: dict[str, RunOutcome] = {}
        self.stats = FuzzStats(blocks=len(harness.coverage.blocks))
        self.status = status
        self._last_sync = 0.0

    # -- corpus ------------------------------------------------------------------------------
    def add_seeds(self, inputs: Iterable[bytes]) -> None:
        for data in inputs:
            self._add(bytes(data[: self.harness.target.max_input_size]), save=False)

    def _add(self, data: bytes, save: bool) -> None:
        if data in self._known:
            return
        self._known.add(data)
        self.corpus.append(data)
        self.stats.corpus = len(self.corpus)
        if save and self.corpus_dir is not None:
            name = f"id-{hashlib.sha1(data).hexdigest()[:16]}"
            self._seen_files.add(name)
            _write_new(self.corpus_dir / name, data)

    def sync(self) -> list[bytes]:
        """Inputs that appeared in the corpus directory since the last look."""
        if self.corpus_dir is None:
            return []
        fresh = []
        try:
            names = sorted(os.listdir(self.corpus_dir))
        except OSError:
            return []
        for name in names:
            if name in self._seen_files or name.startswith("."):
                continue
            self._seen_files.add(name)
            try:
                data = (self.corpus_dir / name).read_bytes()
            except OSError:
                continue
            fresh.append(data)
        return fresh

    # -- the loop ----------------------------------------------------------------------------
    def run(self, *, runs: int | None = None, seconds: float | None = None,
            until_crash: bool = False) -> FuzzStats:
        """Fuzz until `runs` runs, `seconds` seconds, or (with `until_crash`) the first crash."""
        stats = self.stats
        start = time.perf_counter() - stats.elapsed_s
        last_status = 0.0
        queue_: list[bytes] = list(self.corpus) + self.sync()
        if not queue_ and not self.corpus:
            queue_.append(b"")
        self.corpus.clear()
        self._known.clear()
        harness = self.harness
        mutate = self.mutator.mutate
        rng = self.rng
        while True:
            if runs is not None and stats.runs >= runs:
                break
            now = time.perf_counter()
            if seconds is not None and now - start >= seconds:
                break
            if now - self._last_sync >= SYNC_INTERVAL_S:
                self._last_sync = now
                queue_.extend(self.sync())
            count = 1
            if harness.batch_runner is not None:
                count = harness.batch_runner.stats.size
                if runs is not None:
                    count = max(1, min(count, runs - stats.runs))
                if not self.corpus:                  # nothing to mutate before the queue ran
                    count = max(1, min(count, len(queue_)))
            picked: list[tuple[bytes, bool]] = []
            for _ in range(count):
                if queue_:
                    picked.append((queue_.pop(0), True))   # seeds and synced inputs run as they are first
                else:
                    # Half the time the newest entry (the frontier), else any entry.
                    corpus = self.corpus
                    parent = corpus[-1] if rng.random() < 0.5 else corpus[rng.randrange(len(corpus))]
                    picked.append((mutate(parent, corpus), False))
            if harness.batch_runner is None:
                outcomes = [harness.run(picked[0][0])]
            else:
                outcomes = harness.run_batch([data for data, _ in picked])
            crashed = False
            for (_, fresh), outcome in zip(picked, outcomes):
                stats.runs += 1
                if outcome.new_blocks or (fresh and outcome.input not in self._known):
                    stats.hits.update(outcome.new_blocks)
                    self._add(outcome.input, save=bool(outcome.new_blocks))
                if outcome.status is Status.CRASH:
                    stats.crash_runs += 1
                    self._record_crash(outcome)
                    crashed = True
                elif outcome.status is Status.TIMEOUT:
                    stats.timeouts += 1
            if crashed and until_crash:
                break
            if self.status is not None and now - last_status >= STATUS_INTERVAL_S:
                last_status = now
                stats.elapsed_s = now - start
                self.status(stats)
        stats.elapsed_s = time.perf_counter() - start
        stats.hits |= harness.coverage.hits
        if self.status is not None:
            self.status(stats)
        return stats

    def _record_crash(self, outcome: RunOutcome) -> None:
        site = outcome.crash_site
        stats = self.stats
        if stats.first_crash_run is None:
            stats.first_crash_run = stats.runs
        if site in stats.crash_sites:
            return
        stats.crash_sites.add(site)
        self.crashes[site] = outcome
        if self.crashes_dir is not None:
            path = self.crashes_dir / f"crash-{site}"
            if _write_new(path, outcome.input):
                _write_new(path.with_name(path.name + ".txt"),
                           (outcome.summary() + f"\ninput ({len(outcome.input)} bytes): "
                            f"{outcome.input[:256].hex(' ')}\n").encode())


def _write_new(path: Path, data: bytes) -> bool:
    """Write `path` atomically unless it exists (another job may have saved it)."""
    if path.exists():
        return False
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    try:
        os.link(partial, path)
        return True
    except FileExistsError:
        return False
    finally:
        partial.unlink(missing_ok=True)


# --- status line and jobs -------------------------------------------------------------------
class StatusLine:
    """Rewrites one line on a terminal; elsewhere (a log file) writes a line every `log_interval_s`."""

    def __init__(self, stream: TextIO = sys.stderr, log_interval_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.log_interval_s = log_interval_s
        self._last_line = float("-inf")

    def __call__(self, stats: FuzzStats) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + stats.line())
        else:
            now = time.monotonic()
            if now - self._last_line < self.log_interval_s:
                return
            self._last_line = now
            self.stream.write(stats.line() + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def config_harness(config, *, coverage: bool = True, batch: int | None = None) -> Harness:
    """The harness of a config's `fuzz:` target (a Linux program's is `minivmm.linux.fuzz`'s);
    `batch` None takes the config's `fuzz.batch`."""
    from .harness import FuzzError
    if any(image.type == "linux" for image in config.images):
        if batch is not None and batch > 1:
            raise FuzzError("batch mode calls a FUZZ_ENTRY target function; a Linux program is fuzzed "
                            "one run at a time (leave out --batch)")
        from ..linux.config import harness_from_config
        return harness_from_config(config, coverage=coverage)
    if batch is None:
        return Harness.from_config(config, coverage=coverage)
    return Harness.from_config(config, coverage=coverage, batch=batch)


def _job(index: int, config_path: str, options: dict, results: "multiprocessing.Queue") -> None:
    """One worker process: its own machine, fuzzing into the shared directories."""
    from ..config import load_config
    try:
        config = load_config(config_path, options["overrides"])
        harness = config_harness(config, coverage=options["coverage"], batch=options["batch"])
    except Exception as exc:                          # reported by the parent
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    with harness:
        def report(stats: FuzzStats) -> None:
            results.put(("stats", index, _portable(stats)))
        seed = None if options["seed"] is None else options["seed"] + index
        fuzzer = Fuzzer(harness, corpus_dir=options["corpus"], crashes_dir=options["crashes"],
                        seed=seed, status=report)
        fuzzer.run(runs=options["runs"], seconds=options["seconds"])
        results.put(("done", index, _portable(fuzzer.stats)))


def _portable(stats: FuzzStats) -> dict:
    return {"runs": stats.runs, "crash_runs": stats.crash_runs, "timeouts": stats.timeouts,
            "corpus": stats.corpus, "elapsed_s": stats.elapsed_s, "crash_sites": sorted(stats.crash_sites),
            "hits": sorted(stats.hits), "blocks": stats.blocks}


def fuzz_jobs(config_path: str | os.PathLike, *, jobs: int, corpus_dir: str | os.PathLike,
              crashes_dir: str | os.PathLike, runs: int | None = None, seconds: float | None = None,
              seed: int | None = None, coverage: bool = True, overrides: Iterable[str] = (),
              status: Callable[[FuzzStats], None] | None = None, batch: int | None = None) -> FuzzStats:
    """Fuzz with `jobs` processes; `runs` is the total over all jobs. Returns the summed stats.
    `batch`: inputs per guest entry (default: the config's `fuzz.batch`)."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    per_job = None if runs is None else max(1, -(-runs // jobs))
    options = {"corpus": str(corpus_dir), "crashes": str(crashes_dir), "runs": per_job,
               "seconds": seconds, "seed": seed, "coverage": coverage, "overrides": list(overrides),
               "batch": batch}
    workers = [ctx.Process(target=_job, args=(i, str(config_path), options, results), daemon=True)
               for i in range(jobs)]
    for w in workers:
        w.start()
    latest: dict[int, dict] = {}
    done: set[int] = set()
    errors: list[str] = []
    start = time.perf_counter()
    last_status = 0.0
    try:
        while len(done) < jobs:
            try:
                kind, index, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, w in enumerate(workers) if not w.is_alive() and i not in done]
                for i in dead:
                    if workers[i].exitcode not in (0, None):
                        errors.append(f"job {i} died with exit code {workers[i].exitcode}")
                        done.add(i)
                continue
            if kind == "error":
                errors.append(f"job {index}: {payload}")
                done.add(index)
                continue
            latest[index] = payload
            if kind == "done":
                done.add(index)
            now = time.perf_counter()
            if status is not None and now - last_status >= STATUS_INTERVAL_S:
                last_status = now
                status(_sum(latest.values(), now - start))
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
                w.join()
        results.close()
    if errors and not latest:
        raise RuntimeError("; ".join(errors))
    total = _sum(latest.values(), time.perf_counter() - start)
    if status is not None:
        status(total)
    if errors:
        print("minivmm fuzz: " + "; ".join(errors), file=sys.stderr)
    return total


def _sum(parts: Iterable[dict], elapsed: float) -> FuzzStats:
    total = FuzzStats(elapsed_s=elapsed)
    for p in parts:
        total.runs += p["runs"]
        total.crash_runs += p["crash_runs"]
        total.timeouts += p["timeouts"]
        total.corpus = max(total.corpus, p["corpus"])
        total.crash_sites.update(p["crash_sites"])
        total.hits.update(p["hits"])
        total.blocks = max(total.blocks, p["blocks"])
    return total


__all__ = ["Fuzzer", "FuzzStats", "StatusLine", "config_harness", "fuzz_jobs"]
