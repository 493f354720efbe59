"""Exit rate: a guest doing N `out` instructions to a port handled by a Python handler.

The same 16-bit guest runs under a C loop over /dev/kvm (built with gcc now)
and under minivmm in the same run. Last line:
`exit_rate ratio=R minivmm=X/s c=Y/s` with R = minivmm / C.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cbuild import build_c, run_c  # noqa: E402
from minivmm.asm import assemble  # noqa: E402
from minivmm.exits import ExitReason  # noqa: E402
from minivmm.machine import Machine  # noqa: E402

PORT = 0x80
LOAD_ADDRESS = 0x8000


def guest(n: int) -> bytes:
    return assemble(f"""
    mov ${n}, %ecx
1:  out %al, ${PORT}
    inc %al
    dec %ecx
    jnz 1b
    hlt
    """, code_bits=16, load_address=LOAD_ADDRESS).data


def run_minivmm(code: bytes, n: int) -> float:
    with Machine("2M", "real") as machine:
        machine.load(code, LOAD_ADDRESS)
        checksum = 0

        def on_out(vcpu, info):
            nonlocal checksum
            checksum += info.data

        machine.on(ExitReason.IO_INSTRUCTION, on_out, port=PORT)
        result = machine.run(timeout=120)
        if result.reason != "hlt" or result.exits.get("IO_INSTRUCTION") != n:
            raise SystemExit(f"minivmm run ended badly: {result} {result.exits}")
        return n / result.elapsed_s


def run_c_loop(code: bytes, n: int) -> float:
    binary = build_c(Path(__file__).resolve().parent / "c" / "exit_rate.c")
    with tempfile.NamedTemporaryFile(suffix=".bin") as image:
        image.write(code)
        image.flush()
        fields = dict(item.split("=") for item in run_c(binary, image.name, hex(PORT)).split())
    if int(fields["exits"]) != n:
        raise SystemExit(f"C loop saw {fields['exits']} exits, expected {n}")
    return float(fields["rate"])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--exits", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5, help="best of this many interleaved runs each")
    args = parser.parse_args(argv)
    code = guest(args.exits)
    c_rate = py_rate = 0.0
    for _ in range(args.rounds):
        c_rate = max(c_rate, run_c_loop(code, args.exits))
        py_rate = max(py_rate, run_minivmm(code, args.exits))
    ratio = py_rate / c_rate
    print(f"exit_rate ratio={ratio:.2f} minivmm={py_rate:,.0f}/s c={c_rate:,.0f}/s")
    return ratio


if __name__ == "__main__":
    main()
