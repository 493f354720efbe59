"""A GDB remote stub for minivmm guests (`minivmm gdb cfg.yaml`, `Machine.serve_gdb`).

| module | job |
|---|---|
| `packets` | framing: `$...#cs`, acks, escapes, Ctrl-C, an incremental parser (pure) |
| `transport` | TCP / Unix socket listener, one client at a time; a connection's send/receive |
| `protocol` | the commands: one packet in, one answer or resume request out (pure) |
| `registers` | register layouts and target-description XML per mode |
| `bridge` | `MachineTarget`: registers, memory, breakpoints, EPT watchpoints, vCPU threads |
| `monitor` | `monitor vmcs / exits / ept ADDR / caps` |
| `server` | `GdbServer` and `serve_machine`: the session loop |
"""
from .server import GdbServer, SessionEnd, serve_config_machine, serve_machine

__all__ = ["GdbServer", "SessionEnd", "serve_config_machine", "serve_machine"]
