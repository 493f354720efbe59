"""One exception root: every exception class minivmm defines derives from MinivmmError and
keeps its builtin base, so `except MinivmmError` and `except ValueError` (...) both work."""
from __future__ import annotations

import errno
import importlib
import inspect
import pkgutil

import pytest

import minivmm
from minivmm import MinivmmError
from minivmm.errors import MinivmmError as RootFromErrors



def _all_modules() -> list:
    names = [info.name for info in pkgutil.walk_packages(minivmm.__path__, "minivmm.")]
    return [importlib.import_module(name) for name in names]


def _exception_classes() -> dict[str, type[BaseException]]:
    found = {}
    for module in _all_modules():
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("minivmm"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_the_root_is_exported() -> None:
    assert MinivmmError is RootFromErrors
    assert "MinivmmError" in minivmm.__all__
    assert MinivmmError.__bases__ == (Exception,)


def test_every_minivmm_exception_derives_from_minivmm_error() -> None:
    classes = _exception_classes()
    assert "minivmm.kvm.KvmError" in classes and "minivmm.memory.GuestMemoryError" in classes
    missing = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, MinivmmError))
    assert not missing, f"exception classes not derived from MinivmmError: {missing}"


def _kvm_error():
    from minivmm.kvm import KvmError
    return KvmError("KVM_SET_MSRS", errno.EINVAL)


def _kvm_unavailable():
    from minivmm.kvm import KvmUnavailableError
    return KvmUnavailableError("open", errno.ENOENT, "/dev/kvm does not exist")


def _assembly_error():
    from minivmm.asm import AssemblyError
    return AssemblyError("as failed", command=["as"], stderr="bad")


def _binutils_missing():
    from minivmm.asm import BinutilsNotFoundError
    return BinutilsNotFoundError("as not found")


def _unsupported_control():
    from minivmm.controls import UnsupportedControlError
    return UnsupportedControlError("bad bits", 1, 2)


def _loader_error():
    from minivmm.loaders import LoaderError
    return LoaderError("not an ELF file")


def _guest_memory_error():
    from minivmm.memory import GuestMemoryError
    return GuestMemoryError("out of range")


def _page_fault():
    from minivmm.pagewalk import PageFault
    return PageFault(0x1000, 2, "not present")


def _snapshot_error():
    from minivmm.snapshot import SnapshotError
    return SnapshotError("bad magic")


def _guest_run_error():
    from minivmm.testing import GuestRunError
    return GuestRunError("timed out")


def _afl_error():
    from minivmm.fuzz.afl import AflError
    return AflError("bad shm id")


def _coverage_error():
    from minivmm.fuzz.coverage import CoverageError
    return CoverageError("bad range")


def _fuzz_error():
    from minivmm.fuzz.harness import FuzzError
    return FuzzError("bad input buffer")


@pytest.mark.parametrize("make, builtin", [
    (_kvm_error, OSError), (_kvm_unavailable, OSError), (_assembly_error, Exception),
    (_binutils_missing, Exception), (_unsupported_control, ValueError), (_loader_error, ValueError),
    (_guest_memory_error, ValueError), (_page_fault, Exception), (_snapshot_error, RuntimeError),
    (_guest_run_error, AssertionError), (_afl_error, RuntimeError), (_coverage_error, ValueError),
    (_fuzz_error, ValueError),
], ids=lambda value: getattr(value, "__name__", "").lstrip("_"))
def test_converted_classes_construct_and_raise(make, builtin: type[BaseException]) -> None:
    error = make()
    text = str(error)
    for catch in (MinivmmError, builtin, type(error)):
        with pytest.raises(catch) as excinfo:
            raise make()
        assert str(excinfo.value) == text


def test_kvm_error_keeps_its_os_error_fields() -> None:
    error = _kvm_error()
    assert isinstance(error, OSError) and isinstance(error, MinivmmError)
    assert error.errno == errno.EINVAL
    assert error.strerror.startswith("KVM_SET_MSRS failed: EINVAL")
    assert error.ioctl == "KVM_SET_MSRS"
    assert str(error) == "KVM_SET_MSRS failed: EINVAL (Invalid argument): an MSR index is not supported by this host"
    assert error.args == (errno.EINVAL, str(error))
    unavailable = _kvm_unavailable()
    assert unavailable.errno == errno.ENOENT and unavailable.hint == "/dev/kvm does not exist"
    try:
        raise unavailable
    except OSError as exc:                    # `except OSError` code keeps catching it
        assert exc is unavailable


def test_other_fields_survive() -> None:
    page_fault = _page_fault()
    assert (page_fault.gva, int(page_fault.error_code), page_fault.description) == (0x1000, 2, "not present")
    control = _unsupported_control()
    assert (control.must_be_zero, control.must_be_one) == (1, 2)
    assembly = _assembly_error()
    assert (assembly.command, assembly.stderr) == (["as"], "bad")


def test_guest_assertion_error_is_still_an_assertion_error() -> None:
    from minivmm.testing import GuestAssertionError

    class Assertion:
        def describe(self) -> str:
            return "guest.c:3: x == 1 (x = 2)"

    assertion = Assertion()
    with pytest.raises(AssertionError) as excinfo:
        raise GuestAssertionError(assertion)
    assert isinstance(excinfo.value, MinivmmError)
    assert excinfo.value.assertion is assertion and str(excinfo.value) == assertion.describe()
