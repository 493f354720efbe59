"""The gdb stub's packet layer and command session as pure functions over byte strings (no VM)."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from minivmm.gdb.packets import (PACKET_SIZE, BadChecksum, Oversized, Packet, PacketParser,
                                 checksum, escape, frame, unescape)
from minivmm.gdb.protocol import ResumeRequest, Session, StopEvent, TargetError, stop_reply
from minivmm.gdb.registers import layout, layout_for_state


# -- framing ----------------------------------------------------------------------------------
def test_frame_checksum_and_escapes():
    assert frame(b"OK") == b"$OK#9a"
    assert checksum(b"qSupported") == 0x37
    assert escape(b"a$#}*b") == b"a}\x04}\x03}]}\nb"
    assert unescape(escape(bytes(range(256)))) == bytes(range(256))
    with pytest.raises(ValueError):
        unescape(b"abc}")


def test_parser_splits_acks_packets_and_interrupts_in_any_chunks():
    parser = PacketParser()
    stream = b"+$g#67\x03-junk$m10,4#2e"
    events = []
    for i in range(len(stream)):                   # one byte at a time
        events += parser.feed(stream[i:i + 1])
    assert [type(e).__name__ for e in events] == ["Ack", "Packet", "Interrupt", "Nack", "Packet"]
    assert events[1] == Packet(b"g") and events[4] == Packet(b"m10,4")


def test_parser_reports_bad_checksums_oversized_packets_and_restarts_on_dollar():
    parser = PacketParser(limit=8)
    assert parser.feed(b"$g#00") == [BadChecksum(b"g", b"00")]
    assert parser.feed(b"$g#zz") == [BadChecksum(b"g", b"zz")]
    assert parser.feed(b"$" + b"x" * 20 + b"#00") == [Oversized(20)]
    assert parser.feed(b"$garbage$g#67") == [Packet(b"g")]         # gdb started over
    assert parser.feed(b"$g") == [] and parser.inside_packet        # a client cut off mid-packet
    assert PacketParser().limit == PACKET_SIZE


# -- the session over a target double -------------------------------------------------------------
class FakeTarget:
    """A target kept in dicts: the protocol's side only."""

    def __init__(self, arch="i386:x86-64", threads=(1, 2)):
        self._layout = layout(arch)
        self._threads = list(threads)
        self.regs = {t: {"rax": 0x1122334455667788, "rip": 0x100000 + t, "eflags": 0x202, "cs": 0x2b,
                         "xmm0": bytes(range(16))} for t in threads}
        self.memory = bytearray(0x100)
        self.points = []

    def threads(self):
        return self._threads

    def layout(self):
        return self._layout

    def read_registers(self, thread):
        return dict(self.regs[thread])

    def write_register(self, thread, name, value):
        self.regs[thread][name] = value

    def read_memory(self, thread, address, length):
        if address + length > len(self.memory):
            raise TargetError("unmapped", 0x0E)
        return bytes(self.memory[address:address + length])

    def write_memory(self, thread, address, data):
        if address + len(data) > len(self.memory):
            raise TargetError("unmapped", 0x0E)
        self.memory[address:address + len(data)] = data

    def insert_point(self, kind, address, length):
        if kind == 1:
            raise TargetError("no hardware breakpoints", 0x26)
        self.points.append((kind, address, length))

    def remove_point(self, kind, address, length):
        self.points.remove((kind, address, length))

    def monitor(self, thread, command):
        return f"ran {command} on {thread}"

    def thread_name(self, thread):
        return f"vCPU {thread - 1}"


def reply(session, payload: bytes) -> bytes:
    return session.handle(payload).reply


def test_queries():
    s = Session(FakeTarget())
    supported = reply(s, b"qSupported:multiprocess+;swbreak+;xmlRegisters=i386")
    assert b"PacketSize=%x" % PACKET_SIZE in supported and b"QStartNoAckMode+" in supported
    assert b"qXfer:features:read+" in supported and b"swbreak+" in supported
    outcome = s.handle(b"QStartNoAckMode")
    assert outcome.reply == b"OK" and outcome.start_noack
    assert reply(s, b"qAttached") == b"1" and reply(s, b"qAttached:1") == b"1"
    assert reply(s, b"qOffsets") == b"Text=0;Data=0;Bss=0"
    assert reply(s, b"qfThreadInfo") == b"m1,2" and reply(s, b"qsThreadInfo") == b"l"
    assert reply(s, b"qThreadExtraInfo,2") == b"vCPU 1".hex().encode()
    assert reply(s, b"qC") == b"QC1"
    monitor = s.handle(b"qRcmd," + b"exits".hex().encode())
    assert monitor.reply == b"OK" and monitor.output == [b"O" + b"ran exits on 1\n".hex().encode()]
    assert reply(s, b"qTStatus") == b"" and reply(s, b"vMustReplyEmpty") == b""
    assert reply(s, b"?") == b"T05thread:1;"


def test_target_description_read_in_pieces_is_the_layout_xml():
    s = Session(FakeTarget())
    document, offset = b"", 0
    while True:
        chunk = reply(s, b"qXfer:features:read:target.xml:%x,200" % offset)
        document += chunk[1:]
        offset += len(chunk) - 1
        if chunk[:1] == b"l":
            break
        assert chunk[:1] == b"m"
    root = ET.fromstring(document)
    assert root.find("architecture").text == "i386:x86-64"
    names = [r.get("name") for r in root.iter("reg")]
    assert names[:3] == ["rax", "rbx", "rcx"] and "fs_base" in names and "cr3" in names and "efer" in names
    assert reply(s, b"qXfer:features:read:other.xml:0,100").startswith(b"E")


@pytest.mark.parametrize("cr0, efer, arch, pc", [(0x10, 0, "i8086", "eip"), (0x11, 0, "i386", "eip"),
                                                 (0x80000011, 0x500, "i386:x86-64", "rip")])
def test_layout_follows_the_mode(cr0, efer, arch, pc):
    chosen = layout_for_state(cr0, efer)
    assert chosen.architecture == arch and chosen.pc == pc
    ET.fromstring(chosen.xml())               # well-formed


def test_registers_g_p_and_writes():
    target = FakeTarget()
    s = Session(target)
    g = bytes.fromhex(reply(s, b"g").decode())
    assert g[:8] == (0x1122334455667788).to_bytes(8, "little")
    rip = layout("i386:x86-64").number("rip")
    assert reply(s, b"p%x" % rip) == (0x100001).to_bytes(8, "little").hex().encode()
    assert reply(s, b"P%x=%s" % (rip, (0x4000).to_bytes(8, "little").hex().encode())) == b"OK"
    assert target.regs[1]["rip"] == 0x4000
    xmm0 = layout("i386:x86-64").number("xmm0")
    assert reply(s, b"p%x" % xmm0) == bytes(range(16)).hex().encode()
    g2 = bytearray(g)
    g2[8:16] = (0xABCD).to_bytes(8, "little")          # rbx
    assert reply(s, b"G" + g2.hex().encode()) == b"OK"
    assert target.regs[1]["rbx"] == 0xABCD and "rcx" not in target.regs[1]    # only what changed
    assert reply(s, b"Hg2") == b"OK" and reply(s, b"p%x" % rip) == (0x100002).to_bytes(8, "little").hex().encode()
    assert reply(s, b"p999").startswith(b"E") and reply(s, b"P%x=12" % rip) == b"E01"
    assert reply(s, b"Hg9").startswith(b"E") and reply(s, b"T9").startswith(b"E") and reply(s, b"T2") == b"OK"


def test_memory_m_M_and_binary_X():
    target = FakeTarget()
    s = Session(target)
    assert reply(s, b"M10,3:a1b2c3") == b"OK" and target.memory[0x10:0x13] == b"\xa1\xb2\xc3"
    assert reply(s, b"m10,3") == b"a1b2c3"
    assert reply(s, b"X20,4:" + escape(b"$#}*")) == b"OK" and target.memory[0x20:0x24] == b"$#}*"
    assert reply(s, b"X20,0:") == b"OK"
    assert reply(s, b"mff0,4") == b"E0e"                          # unmapped: EFAULT
    assert reply(s, b"M10,4:a1b2c3") == b"E01"                    # length and data disagree
    assert reply(s, b"m10") == b"E01" and reply(s, b"mzz,1") == b"E01" and reply(s, b"X20,1") == b"E01"


def test_breakpoints_and_refused_hardware_breakpoints():
    target = FakeTarget()
    s = Session(target)
    assert reply(s, b"Z0,100000,1") == b"OK" and reply(s, b"Z2,2000,10000") == b"OK"
    assert target.points == [(0, 0x100000, 1), (2, 0x2000, 0x10000)]
    assert reply(s, b"z0,100000,1") == b"OK" and target.points == [(2, 0x2000, 0x10000)]
    assert reply(s, b"Z1,100000,1") == b"E26"
    assert reply(s, b"Z0,zz") == b"E01"


def test_resume_requests():
    s = Session(FakeTarget())
    assert reply(s, b"vCont?") == b"vCont;c;C;s;S"
    assert s.handle(b"vCont;c").resume == ResumeRequest({1: "c", 2: "c"})
    assert s.handle(b"vCont;s:2").resume == ResumeRequest({2: "s"})
    assert s.handle(b"vCont;s:1;c").resume == ResumeRequest({1: "s", 2: "c"})
    assert s.handle(b"vCont;S05:p1.2;c").resume == ResumeRequest({2: "s", 1: "c"})
    assert s.handle(b"c").resume == ResumeRequest({1: "c", 2: "c"})
    assert reply(s, b"Hc2") == b"OK" and s.handle(b"s").resume == ResumeRequest({2: "s"})
    assert reply(s, b"vCont;t") == b""                      # stop actions are not offered
    assert reply(s, b"vCont;c:9").startswith(b"E")
    assert s.handle(b"D").detach and s.handle(b"k").kill and s.handle(b"vKill;1").kill


def test_a_stop_makes_its_thread_the_general_one():
    s = Session(FakeTarget())
    assert s.stopped(StopEvent(5, 2, "swbreak")) == b"T05thread:2;swbreak:;"
    assert reply(s, b"g") == s._encode(FakeTarget().read_registers(2))     # no Hg2 needed
    assert reply(s, b"?") == b"T05thread:2;swbreak:;"


def test_stop_replies():
    assert stop_reply(StopEvent(5, 2, "swbreak")) == b"T05thread:2;swbreak:;"
    assert stop_reply(StopEvent(5, 1, "watch", 0x102000)) == b"T05thread:1;watch:102000;"
    assert stop_reply(StopEvent(14, 1)) == b"T0ethread:1;"
    assert stop_reply(StopEvent(exit_code=7)) == b"W07"


def test_garbage_gets_an_error_or_the_empty_reply():
    s = Session(FakeTarget())
    for payload in (b"", b"\xff\xfe", b"Zq", b"H", b"Hx1", b"p", b"qXfer:features:read:target.xml:zz",
                    b"qRcmd,zz", b"vCont;", b"m" + b"9" * 5000 + b",1"):
        answer = reply(s, payload)
        assert answer == b"" or answer.startswith(b"E"), (payload, answer)


def test_long_monitor_output_is_split_into_console_packets():
    class Chatty(FakeTarget):
        def monitor(self, thread, command):
            return "x" * (3 * PACKET_SIZE)
    outcome = Session(Chatty()).handle(b"qRcmd," + b"vmcs".hex().encode())
    assert len(outcome.output) >= 6 and all(len(frame(p)) <= PACKET_SIZE for p in outcome.output)
    assert b"".join(bytes.fromhex(p[1:].decode()) for p in outcome.output) == b"x" * (3 * PACKET_SIZE) + b"\n"


def test_protocol_modules_are_pure():
    """packets, protocol and registers work on bytes only: no sockets, no KVM, no machine."""
    import ast
    from pathlib import Path
    package = Path(__file__).resolve().parent.parent / "minivmm" / "gdb"
    allowed_local = {"packets", "protocol", "registers"}
    for name in sorted(allowed_local):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    assert node.module in allowed_local, f"{name}.py imports .{node.module}"
                    continue
                if node.level == 2 and node.module == "errors":
                    continue                       # minivmm.errors: the exception root, itself pure
                assert node.level == 0, f"{name}.py imports from outside minivmm.gdb"
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in ("__future__", "dataclasses", "functools", "typing"), \
                    f"{name}.py imports {module}"
