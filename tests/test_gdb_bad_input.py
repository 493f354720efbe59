"""Bad input to the gdb stub from raw sockets: malformed packets, wrong checksums, oversized
packets, a client cut off mid-packet, a second client; the guest and this process go on."""
from __future__ import annotations

import gc
import os
import socket
import threading
from pathlib import Path

import pytest

from gdb_harness import GDB, gdb_session
from minivmm import Machine
from minivmm.gdb.packets import PACKET_SIZE, frame

pytestmark = pytest.mark.kvm

GUEST = Path(__file__).resolve().parent.parent / "guests" / "gdb" / "target.S"


def open_fds() -> int:
    """The process's open fds, after a collection: a machine an earlier test dropped without
    closing holds its fds until the collector frees it, which may fall inside this test."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


OPEN_CLIENTS: list["RawClient"] = []


class RawClient:
    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""
        OPEN_CLIENTS.append(self)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int = 1) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the stub closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def packet(self) -> bytes:
        """The next packet's payload (acks before it are skipped)."""
        while self.read() != b"$":
            pass
        body = b""
        while (b := self.read()) != b"#":
            body += b
        self.read(2)
        return body

    def ask(self, payload: bytes) -> bytes:
        self.send(frame(payload))
        assert self.read() == b"+"
        return self.packet()

    def close(self) -> None:
        self.sock.close()


def serve_to(machine, client_script, **options):
    """Serve `machine` while `client_script(address)` runs in a thread; its return value or
    exception comes back with the run's result."""
    outcome: dict = {}

    def ready(address: str) -> None:
        def run() -> None:
            try:
                outcome["value"] = client_script(address)
            except BaseException as exc:           # reported by the test below
                outcome["error"] = exc
            finally:                               # a failed script must not leave the stub waiting
                while OPEN_CLIENTS:
                    OPEN_CLIENTS.pop().close()
        thread = outcome["thread"] = threading.Thread(target=run, daemon=True)
        thread.start()

    result = machine.serve_gdb(port=0, ready=ready, timeout=20, accept_timeout=10, **options)
    outcome["thread"].join(10)
    if "error" in outcome:
        raise outcome["error"]
    return result, outcome.get("value")


def test_malformed_packets_bad_checksums_and_oversized_packets_get_protocol_answers():
    before = open_fds()

    def script(address):
        c = RawClient(address)
        answers = {}
        c.send(b"$g#00")                                        # wrong checksum: send it again
        answers["bad checksum"] = c.read()
        c.send(b"$" + b"m" * (PACKET_SIZE + 100) + b"#00")        # longer than PacketSize
        answers["oversized"] = (c.read(), c.packet())
        for payload in (b"mzz,1", b"Zq", b"M0,2:abc", b"X0,4:ab", b"p9999", b"Hg77", b"vCont;x"):
            answers[payload] = c.ask(payload)
        c.send(b"junk outside packets +++")
        answers["g"] = c.ask(b"g")
        answers["detach"] = c.ask(b"D")
        c.close()
        return answers

    with Machine(mode="user") as m:
        m.load_asm(GUEST)
        result, answers = serve_to(m, script)
        assert answers["bad checksum"] == b"-"
        assert answers["oversized"] == (b"+", b"E02")
        for payload in (b"mzz,1", b"Zq", b"M0,2:abc", b"X0,4:ab", b"Hg77"):
            assert answers[payload].startswith(b"E"), (payload, answers[payload])
        assert answers[b"p9999"].startswith(b"E") and answers[b"vCont;x"] == b""
        assert len(answers["g"]) > 200 and answers["detach"] == b"OK"
        assert result.reason == "exit" and result.exit_code == 7      # the guest ran on, unharmed
    assert open_fds() == before                                         # sockets, pipes, VM fds closed


def test_client_cut_off_mid_packet_detaches_and_the_guest_finishes():
    def script(address):
        c = RawClient(address)
        assert c.ask(b"Z0,%x,1" % m.symbols["bp_add"]) == b"OK"
        c.send(b"$m100000,4")                                    # and gone
        c.close()

    with Machine(mode="user") as m:
        m.load_asm(GUEST)
        result, _ = serve_to(m, script)
        assert result.reason == "exit" and result.exit_code == 7
        assert m.symbols["bp_add"] not in m.breakpoints           # its breakpoint went with it


def test_a_second_client_is_refused_while_the_first_is_served():
    def script(address):
        first = RawClient(address)
        assert first.ask(b"?") == b"T05thread:1;"
        second = RawClient(address)
        second.send(frame(b"?"))
        second.sock.settimeout(5)
        try:
            refused = second.sock.recv(100)                       # closed without an answer
        except ConnectionResetError:                              # ... with our packet unread
            refused = b""
        second.close()
        assert first.ask(b"qC") == b"QC1"                         # the first is unaffected
        first.send(frame(b"c"))
        assert first.read() == b"+"
        stop = first.packet()
        first.close()
        return refused, stop

    with Machine(mode="user") as m:
        m.load_asm(GUEST)
        result, (refused, stop) = serve_to(m, script)
        assert refused == b"" and stop == b"W07"
        assert result.exit_code == 7


@pytest.mark.skipif(GDB is None, reason="gdb is not installed (make setup)")
def test_unix_socket_transport(tmp_path):
    path = tmp_path / "gdb.sock"
    with Machine(mode="long") as m:
        m.load_asm(GUEST)
        run = gdb_session(m, [f"break *{m.symbols['after_add']:#x}", "continue", 'printf "eax=%x\\n", $eax',
                              "continue"], socket_path=str(path))
        assert run.value("eax") == 0x3333, run.output
        assert run.result.exit_code == 7
    assert not path.exists()                                      # the socket file is removed


def test_a_taken_port_or_a_file_in_the_way_is_a_clear_error(tmp_path):
    from minivmm.errors import MinivmmError
    from minivmm.gdb.transport import ListenError, Listener
    with Listener(0) as taken:
        with pytest.raises(ListenError, match=rf"cannot listen for gdb on 127.0.0.1:{taken.port}: "):
            Listener(taken.port)
    in_the_way = tmp_path / "not-a-socket"
    in_the_way.write_text("data")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        Listener(socket_path=in_the_way)
    assert in_the_way.read_text() == "data" and issubclass(ListenError, MinivmmError)
