"""The pytest plugin (minivmm.testing) and the guest-to-host test channel (minivmm.guestchannel).

Guest tests run on /dev/kvm; the plugin's reporting, skipping, mode
parametrization and xdist behaviour are checked with pytester, in-process
where possible.
"""
from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

from minivmm.guestchannel import (MV_HC_ASSERT, MV_HC_BASE, MV_HC_DONE, MV_HC_PRINTF, MV_HC_SYNC,
                                  format_guest_printf, prepare_asm_source)

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "minivmm" / "guest_include"
# options of the inner pytest runs: no cache files, and no slow unrelated plugins if installed
INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark")


# -- host-side pieces without a guest ----------------------------------------------------------
class TestWithoutKvm:
    pytestmark = []          # these need no /dev/kvm

    def test_hypercall_numbers_are_the_documented_ones(self):
        assert (MV_HC_BASE, MV_HC_DONE, MV_HC_SYNC, MV_HC_ASSERT, MV_HC_PRINTF) == \
            (0x4D560000, 0x4D560000, 0x4D560001, 0x4D560002, 0x4D560003)
        inc = (INCLUDE / "guest_test.inc").read_text()
        header = (INCLUDE / "minivmm_test.h").read_text()
        for name, value in (("MV_HC_SYNC", "0x4d560001"), ("MV_HC_ASSERT", "0x4d560002"),
                            ("MV_HC_PRINTF", "0x4d560003")):
            assert re.search(rf"\.set {name},\s+{value}\n", inc)
        assert "#define MV_HC_BASE   0x4d560000u" in header

    @pytest.mark.parametrize("fmt, args, width, expected", [
        ("%d %i", [(1 << 64) - 5, 7], 8, "-5 7"),
        ("%d", [0xFFFF_FFFF], 4, "-1"),
        ("%u %x %X %o", [0xFFFF_FFFF, 255, 255, 8], 4, "4294967295 ff FF 10"),
        ("%hhx %hd", [0x1FF, 0xFFFF], 8, "ff -1"),
        ("[%5d|%-5d|%05x|%#x]", [42, 42, 0xAB, 0xAB], 8, "[   42|42   |000ab|0xab]"),
        ("%c%c %s %p %p %%", [ord("o"), ord("k"), 0x1000, 0x1234, 0], 8, "ok text 0x1234 (nil) %"),
        ("%*d|%.*s", [4, 7, 2, 0x1000], 8, "   7|te"),
        ("%s", [0], 8, "(null)"),
    ])
    def test_printf_subset(self, fmt, args, width, expected):
        strings = {0x1000: "text"}
        assert format_guest_printf(fmt, args, width, strings.__getitem__) == expected

    def test_printf_with_too_few_arguments_says_so(self):
        with pytest.raises(ValueError, match="needs more arguments"):
            format_guest_printf("%d %d", [1], 8, str)

    def test_source_preparation_keeps_line_numbers(self):
        text = "_start:\n    nop\n    GUEST_SYNC $1, $2\n    GUEST_DONE\n"
        prepared = prepare_asm_source(text, "dir/t.S", 10).split("\n")
        assert '__mv_file: .asciz "dir/t.S"' in prepared[0]
        assert prepared[1] == '.include "guest_test.inc"'
        assert prepared[2] == '# 10 "dir/t.S"'
        assert prepared[3:5] == ["_start:", "    nop"]
        assert prepared[5] == ".set __mv_line, 12 ; " + "    GUEST_SYNC $1, $2"
        assert prepared[6].startswith(".set __mv_line, 13 ; ")
        assert len(prepared) == len(text.split("\n")) + 3

    def test_kvm_path_comes_from_the_environment(self, monkeypatch, tmp_path):
        from minivmm.testing import kvm_unavailable_reason
        monkeypatch.setenv("MINIVMM_KVM_PATH", str(tmp_path / "no-kvm"))
        assert "no-kvm does not exist" in kvm_unavailable_reason()


def _line_of(text: str) -> int:
    """The 1-based line of this file that starts with `text` (there must be one)."""
    lines = [i + 1 for i, line in enumerate(Path(__file__).read_text().split("\n")) if line.startswith(text)]
    assert len(lines) == 1, lines
    return lines[0]


def _display(path: str) -> str:
    import os
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


# -- guests, through the fixtures directly ----------------------------------------------------------
SYNC_GUEST = r"""
_start:
    mov $0x11, %rbx
    GUEST_SYNC $1, $0x100
    GUEST_ASSERT_EQ %rbx, $0x1234       /* the host set RBX at stage 1 */
    mov %rbx, %rcx
    GUEST_SYNC $2, %rcx
    GUEST_ASSERT_EQ %rax, $77           /* the host's reply to stage 2 */
    GUEST_DONE
"""


def test_sync_stages_arrive_in_order_and_host_changes_take_effect(guest):
    vm = guest.asm(SYNC_GUEST)
    first = vm.sync()
    assert (first.stage, first.value) == (1, 0x100)
    vm.vcpu.rbx = 0x1234
    second = vm.sync(2)
    assert second.value == 0x1234
    vm.vcpu.rax = 77
    result = vm.done()
    assert [s.stage for s in vm.channel.syncs] == [1, 2]
    assert result.exit_sequence == ["EXECUTE_VMCALL"]
    assert vm.exit_sequence == ["EXECUTE_VMCALL"] * 3


def test_sync_in_the_wrong_order_fails_clearly(guest):
    vm = guest.asm(SYNC_GUEST)
    with pytest.raises(AssertionError, match="expected GUEST_SYNC stage 2, got GUEST_SYNC stage 1"):
        vm.sync(2)


def test_exit_sequence_has_io_and_channel_exits_in_order(guest):
    vm = guest.asm(r"""
_start:
    PUTS msg
    GUEST_PRINTF "after %s\n", $msg
    mov $0x3f8, %dx
    mov $'!', %al
    out %al, %dx
    GUEST_DONE
msg: .asciz "ab"
""")
    run = vm.done()
    assert run.exit_sequence == ["IO_INSTRUCTION", "IO_INSTRUCTION", "EXECUTE_VMCALL",
                                 "IO_INSTRUCTION", "EXECUTE_VMCALL"]
    assert run.console == "ab!"
    assert vm.printed == "after ab\n"


def test_printf_reaches_the_test_output(guest, capsys):
    vm = guest.asm(r"""
_start:
    mov $-3, %rax
    GUEST_PRINTF "v=%d u=%u x=%#x c=%c s=%s\n", %rax, $5, $255, $'Q', $word
    GUEST_DONE
word: .asciz "guest"
""")
    vm.done()
    assert capsys.readouterr().out == "v=-3 u=5 x=0xff c=Q s=guest\n"


def test_assert_macros_preserve_registers_and_flags(guest):
    vm = guest.asm(r"""
_start:
    mov $1, %rax
    mov $2, %rbx
    mov $3, %rcx
    mov $4, %rdx
    cmp $1, %rax
    GUEST_ASSERT_EQ %rbx, $2
    GUEST_ASSERT_NE %rcx, $4
    GUEST_PRINTF "%d\n", %rdx
    GUEST_ASSERT e                   /* ZF from the cmp above survived */
    GUEST_SYNC $9, $0
""")
    vm.sync(9)
    regs = vm.registers()
    assert (regs["rcx"], regs["rdx"]) == (0, 4)      # GUEST_SYNC itself loads RBX/RCX
    assert vm.printed == "4\n"


def test_failed_assert_in_real_mode_reports_16_bit_values_and_registers(guest):
    vm = guest.asm(r"""
_start:
    mov $0x1234, %bx
    mov $-2, %ax
    GUEST_ASSERT_EQ %ax, $3
    GUEST_DONE
""", "real")
    from minivmm.testing import GuestAssertionError
    with pytest.raises(GuestAssertionError) as caught:
        vm.done()
    failure = caught.value.assertion
    assert (failure.macro, failure.expression, failure.line) == \
        ("GUEST_ASSERT_EQ", "%ax == $3", _line_of("    GUEST_ASSERT_EQ %ax, $3"))
    assert failure.file.endswith("test_plugin.py")
    assert (failure.left, failure.right) == (0xFFFE, 3)
    assert "left:  0xfffe (-2)" in str(caught.value)
    assert failure.registers["rbx"] & 0xFFFF == 0x1234
    assert failure.registers["rax"] & 0xFFFF == 0xFFFE
    assert failure.registers["rsp"] == 0x7C00
    assert failure.rip == vm.symbols["_start"] + 6


def test_failed_condition_code_assert_in_protected_mode(guest):
    vm = guest.asm(r"""
_start:
    mov $7, %esi
    cmp $8, %esi
    GUEST_ASSERT ae
    GUEST_DONE
""", "protected")
    run = vm.run(raise_on_assert=False)
    assert run.reason == "assert_failed"
    failure = run.assertion
    assert (failure.macro, failure.expression, failure.left) == ("GUEST_ASSERT", "ae", None)
    assert failure.line == _line_of("    GUEST_ASSERT ae")
    assert failure.registers["rsi"] == 7 and failure.registers["rflags"] & 1     # CF from the cmp
    assert "left" not in str(failure)


def test_unknown_channel_hypercall_stops_with_an_error_and_others_pass_through(guest):
    vm = guest.asm(r"""
_start:
    mov $0x1234, %eax
    out %al, $0xf5                  /* not a channel number: minivmm's default answers -1000 */
    GUEST_SYNC $1, %rax
    mov $0x4d5600ff, %eax
    out %al, $0xf5
""")
    assert vm.sync(1).value == (-1000) & (1 << 64) - 1
    run = vm.run()
    assert run.reason == "error" and "unknown minivmm test-channel hypercall 0x4d5600ff" in run.message


@pytest.mark.guest_mode("real", "protected", "long", "user")
def test_one_guest_in_every_mode(guest, guest_mode):
    reg = {"real": "%ax", "protected": "%eax"}.get(guest_mode, "%rax")
    vm = guest.asm(f"""
_start:
    mov $40, {reg}
    add $2, {reg}
    GUEST_ASSERT_EQ {reg}, $42
    GUEST_PRINTF "%d in %s mode\\n", {reg}, $name
    GUEST_SYNC $1, {reg}
    GUEST_DONE
name: .asciz "{guest_mode}"
""")
    assert vm.machine.mode.value == guest_mode
    assert vm.sync(1).value == 42
    vm.done()
    assert vm.printed == f"42 in {guest_mode} mode\n"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("mode", ["user", "protected"])
def test_c_guest(guest, mode):
    vm = guest.c(r"""
#include "minivmm_test.h"

static long square(long x) { return x * x; }

void guest_main(void)
{
    GUEST_ASSERT(square(3) == 9);
    unsigned long reply = GUEST_SYNC(1, square(5));
    GUEST_PRINTF("reply=%lu %s %d\n", reply, "ok", -1);
    GUEST_ASSERT_EQ(reply, 26);
}
""", mode)
    assert vm.sync(1).value == 25
    vm.vcpu.rax = 26
    vm.done()
    assert vm.printed == "reply=26 ok -1\n"


def test_failed_c_assert_reports_the_c_line(guest):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    vm = guest.c(r"""
#include "minivmm_test.h"
void guest_main(void)
{
    int values[3] = {1, 2, 4};
    for (int i = 0; i < 3; i++)
        GUEST_ASSERT_EQ(values[i], 1 << i + (i == 2));
}
""")
    from minivmm.testing import GuestAssertionError
    with pytest.raises(GuestAssertionError) as caught:
        vm.done()
    failure = caught.value.assertion
    assert failure.expression == "values[i] == 1 << i + (i == 2)"
    assert (failure.left, failure.right) == (4, 8)
    assert failure.location == f"{_display(__file__)}:{_line_of('        GUEST_ASSERT_EQ(values[i]')}"


def test_yaml_config_guest(guest):
    pytest.importorskip("minivmm.config")
    vm = guest.config(ROOT / "configs" / "hello_long.yaml")
    run = vm.run()
    assert (run.reason, run.exit_code) == ("exit", 0)
    assert "Hello from long mode" in run.console
    assert "IO_INSTRUCTION" in run.exit_sequence


def test_guest_file_from_guests_dir(guest):
    vm = guest.file("hello_user.S", "user")
    run = vm.run()
    assert (run.reason, run.exit_code) == ("exit", 0)


# -- the plugin as pytest users see it (pytester) ---------------------------------------------------
def test_passing_guest_test(pytester):
    pytester.makepyfile(r'''
        def test_ok(guest):
            vm = guest.asm("""
        _start:
            GUEST_ASSERT_EQ $1, $1
            GUEST_DONE
        """)
            assert vm.done().reason == "done"
    ''')
    pytester.runpytest_inprocess(*INNER).assert_outcomes(passed=1)


def test_failing_guest_assert_report(pytester):
    guests = pytester.mkdir("guests")
    (guests / "bad.S").write_text(textwrap.dedent("""\
        /* a guest whose assertion fails */
        _start:
            mov $0x4, %rax
            mov $0xabc, %r12
            GUEST_ASSERT_EQ %rax, $5
            GUEST_DONE
        """))
    pytester.makepyfile("""
        def test_bad(guest):
            guest.file("bad.S").done()
    """)
    result = pytester.runpytest_inprocess(*INNER)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*GuestAssertionError: GUEST_ASSERT_EQ failed at guests/bad.S:5: %rax == $5",
        "*left:  0x4 (4)",
        "*right: 0x5 (5)",
        "*- minivmm guest #0 -*",
        "machine #0: mode long, guests/bad.S",
        "last run ended: assert_failed*",
        "exit sequence: EXECUTE_VMCALL",
        "registers:",
        "RAX=0000000000000004*",
        "*R12=0000000000000abc*",
        "code:",
        "=> 0x0010000e <_start+0xe> * pushfq",
        "console: (empty)",
    ])


def test_host_side_failure_report_has_exception_disassembly_and_console(pytester):
    pytester.makepyfile(r'''
        def test_crash(guest):
            vm = guest.asm("""
        _start:
            PUTS msg
            ud2
        msg: .asciz "line one\\nline two\\n"
        """, "user")
            run = vm.run()
            assert run.reason == "exit"
    ''')
    result = pytester.runpytest_inprocess(*INNER)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*assert 'exception' == 'exit'*",
        "*- minivmm guest #0 -*",
        "last run ended: exception: #UD*",
        "exit sequence: IO_INSTRUCTION * EXCEPTION_OR_NMI",
        "=> 0x* <_start+0x*> *0f 0b * ud2",
        "console (last 20 lines):",
        "  line one",
        "  line two",
    ])


def test_trace_option_writes_the_failing_tests_trace(pytester):
    pytester.makepyfile(r'''
        import pytest

        @pytest.mark.guest_mode("long", "user")
        def test_traced(guest):
            vm = guest.asm("""
        _start:
            mov $1, %rcx
            add %rcx, %rcx
            GUEST_ASSERT_EQ %rcx, $3
            GUEST_DONE
        """)
            vm.done()

        def test_passes(guest):
            guest.asm("GUEST_DONE\n").done()
    ''')
    result = pytester.runpytest_inprocess(*INNER, "--minivmm-trace",
                                          f"--minivmm-trace-dir={pytester.path / 'traces'}")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*MTF trace: * instructions stepped*",
                                 "0x00100000 <_start+0x0> * mov rcx, 1",
                                 "0x00100007 <_start+0x7> * add rcx, rcx"])
    traces = sorted(p.name for p in (pytester.path / "traces").iterdir())
    assert traces == ["test_trace_option_writes_the_failing_tests_trace.py_test_traced_long.vm0.trace",
                      "test_trace_option_writes_the_failing_tests_trace.py_test_traced_user.vm0.trace"]
    text = (pytester.path / "traces" / traces[1]).read_text()
    assert "add rcx, rcx" in text and "-- exit EXECUTE_VMCALL" in text


def test_kvm_marker_skips_with_the_reason_when_kvm_is_missing(pytester, monkeypatch):
    monkeypatch.setenv("MINIVMM_KVM_PATH", str(pytester.path / "missing-kvm"))
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm
        def test_marked():
            pass

        def test_uses_guest(guest):
            pass

        def test_plain():
            pass
    """)
    result = pytester.runpytest_inprocess(*INNER, "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *:3: needs KVM: */missing-kvm does not exist*",
                                 "SKIPPED [[]1[]] *needs KVM: */missing-kvm does not exist*"])


def test_a_skipped_kvm_test_fails_in_ci(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("MINIVMM_KVM_PATH", raising=False)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm
        def test_gives_up():
            pytest.skip("fixture broke")
    """)
    result = pytester.runpytest_inprocess(*INNER)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*KVM test skipped in CI although * is present*fixture broke*"])


def test_guest_mode_marker_parametrizes(pytester):
    pytester.makepyfile(r'''
        import pytest

        @pytest.mark.guest_mode("real", "long")
        def test_marked(guest, guest_mode):
            vm = guest.asm("_start:\n GUEST_DONE\n")
            assert vm.machine.mode.value == guest_mode
            vm.done()

        @pytest.mark.guest_mode("protected")
        def test_marker_without_the_fixture(guest):
            vm = guest.asm("_start:\n GUEST_DONE\n")
            assert vm.machine.mode.value == "protected"
            vm.done()

        def test_every_mode(guest_mode):
            pass

        @pytest.mark.guest_mode("vm86")
        def test_bad_mode(guest_mode):
            pass
    ''')
    result = pytester.runpytest_inprocess(*INNER, "-v")
    result.stdout.fnmatch_lines_random([
        "*test_marked?real? PASSED*", "*test_marked?long? PASSED*",
        "*test_marker_without_the_fixture?protected? PASSED*",
        "*test_every_mode?real? PASSED*", "*test_every_mode?protected? PASSED*",
        "*test_every_mode?long? PASSED*", "*test_every_mode?user? PASSED*",
        "*unknown guest_mode 'vm86'*",
    ])


def test_xdist_runs_twenty_guest_tests(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(r'''
        import pytest

        @pytest.mark.parametrize("n", range(20))
        def test_many(guest, n):
            vm = guest.asm("""
        _start:
            mov $%d, %%rbx
            GUEST_SYNC $1, %%rbx
            GUEST_ASSERT_EQ %%rcx, $%d
            GUEST_DONE
        """ % (n, n), "user" if n % 2 else "long")
            assert vm.sync(1).value == n
            vm.done()
    ''')
    result = pytester.runpytest_subprocess(*INNER, "-n", "2")
    result.assert_outcomes(passed=20)
    result.stdout.fnmatch_lines(["*2 workers [[]20 items[]]*"])


def test_examples_pass(pytester):
    """examples/ is part of the project's test run (it takes about a second)."""
    if shutil.which("gcc") is None:
        pytest.skip("the C example needs gcc")
    result = pytester.runpytest_inprocess(*INNER, str(ROOT / "examples"))
    result.assert_outcomes(passed=6)
