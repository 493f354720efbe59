"""VMCS field encodings and segment access rights (SDM vol. 3C 25.11.2, appendix B, 25.4.1).

A field encoding is 32 bits (SDM 25.11.2, "Structure of VMCS Component Encoding"): bit 0 access type
(0 = full, 1 = high half of a 64-bit field), bits 9:1 index, bits 11:10 type
(control, read-only data, guest state, host state), bit 12 reserved, bits
14:13 width (16-bit, 64-bit, 32-bit, natural), bits 31:15 reserved.
:class:`VmcsField` lists the full encodings; the high half of a 64-bit field
is :func:`high_encoding`.
"""

from __future__ import annotations

from enum import IntEnum


class VmcsField(IntEnum):
    """Every VMCS field encoding of SDM vol. 3C appendix B, grouped as there (B.1-B.4)."""

    # B.1.1 16-bit control fields
    VMCS_CTRL_VIRTUAL_PROCESSOR_IDENTIFIER = 0x0000
    VMCS_CTRL_POSTED_INTERRUPT_NOTIFICATION_VECTOR = 0x0002
    VMCS_CTRL_EPTP_INDEX = 0x0004
    VMCS_CTRL_HLAT_PREFIX_SIZE = 0x0006
    VMCS_CTRL_LAST_PID_POINTER_INDEX = 0x0008
    # B.1.2 16-bit guest-state fields
    VMCS_GUEST_ES_SELECTOR = 0x0800
    VMCS_GUEST_CS_SELECTOR = 0x0802
    VMCS_GUEST_SS_SELECTOR = 0x0804
    VMCS_GUEST_DS_SELECTOR = 0x0806
    VMCS_GUEST_FS_SELECTOR = 0x0808
    VMCS_GUEST_GS_SELECTOR = 0x080A
    VMCS_GUEST_LDTR_SELECTOR = 0x080C
    VMCS_GUEST_TR_SELECTOR = 0x080E
    VMCS_GUEST_INTERRUPT_STATUS = 0x0810
    VMCS_GUEST_PML_INDEX = 0x0812
    VMCS_GUEST_UINV = 0x0814
    # B.1.3 16-bit host-state fields
    VMCS_HOST_ES_SELECTOR = 0x0C00
    VMCS_HOST_CS_SELECTOR = 0x0C02
    VMCS_HOST_SS_SELECTOR = 0x0C04
    VMCS_HOST_DS_SELECTOR = 0x0C06
    VMCS_HOST_FS_SELECTOR = 0x0C08
    VMCS_HOST_GS_SELECTOR = 0x0C0A
    VMCS_HOST_TR_SELECTOR = 0x0C0C

    # B.2.1 64-bit control fields
    VMCS_CTRL_IO_BITMAP_A_ADDRESS = 0x2000
    VMCS_CTRL_IO_BITMAP_B_ADDRESS = 0x2002
    VMCS_CTRL_MSR_BITMAP_ADDRESS = 0x2004
    VMCS_CTRL_VMEXIT_MSR_STORE_ADDRESS = 0x2006
    VMCS_CTRL_VMEXIT_MSR_LOAD_ADDRESS = 0x2008
    VMCS_CTRL_VMENTRY_MSR_LOAD_ADDRESS = 0x200A
    VMCS_CTRL_EXECUTIVE_VMCS_POINTER = 0x200C
    VMCS_CTRL_PML_ADDRESS = 0x200E
    VMCS_CTRL_TSC_OFFSET = 0x2010
    VMCS_CTRL_VIRTUAL_APIC_ADDRESS = 0x2012
    VMCS_CTRL_APIC_ACCESS_ADDRESS = 0x2014
    VMCS_CTRL_POSTED_INTERRUPT_DESCRIPTOR_ADDRESS = 0x2016
    VMCS_CTRL_VM_FUNCTION_CONTROLS = 0x2018
    VMCS_CTRL_EPT_POINTER = 0x201A
    VMCS_CTRL_EOI_EXIT_BITMAP_0 = 0x201C
    VMCS_CTRL_EOI_EXIT_BITMAP_1 = 0x201E
    VMCS_CTRL_EOI_EXIT_BITMAP_2 = 0x2020
    VMCS_CTRL_EOI_EXIT_BITMAP_3 = 0x2022
    VMCS_CTRL_EPTP_LIST_ADDRESS = 0x2024
    VMCS_CTRL_VMREAD_BITMAP_ADDRESS = 0x2026
    VMCS_CTRL_VMWRITE_BITMAP_ADDRESS = 0x2028
    VMCS_CTRL_VIRTUALIZATION_EXCEPTION_INFORMATION_ADDRESS = 0x202A
    VMCS_CTRL_XSS_EXITING_BITMAP = 0x202C
    VMCS_CTRL_ENCLS_EXITING_BITMAP = 0x202E
    VMCS_CTRL_SUB_PAGE_PERMISSION_TABLE_POINTER = 0x2030
    VMCS_CTRL_TSC_MULTIPLIER = 0x2032
    VMCS_CTRL_TERTIARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS = 0x2034
    VMCS_CTRL_ENCLV_EXITING_BITMAP = 0x2036
    VMCS_CTRL_LOW_PASID_DIRECTORY_ADDRESS = 0x2038
    VMCS_CTRL_HIGH_PASID_DIRECTORY_ADDRESS = 0x203A
    VMCS_CTRL_SHARED_EPT_POINTER = 0x203C
    VMCS_CTRL_PCONFIG_EXITING_BITMAP = 0x203E
    VMCS_CTRL_HLAT_POINTER = 0x2040
    VMCS_CTRL_PID_POINTER_TABLE_ADDRESS = 0x2042
    VMCS_CTRL_SECONDARY_VMEXIT_CONTROLS = 0x2044
    VMCS_CTRL_IA32_SPEC_CTRL_MASK = 0x204A
    VMCS_CTRL_IA32_SPEC_CTRL_SHADOW = 0x204C
    # B.2.2 64-bit read-only data fields
    VMCS_GUEST_PHYSICAL_ADDRESS = 0x2400
    # B.2.3 64-bit guest-state fields
    VMCS_GUEST_VMCS_LINK_POINTER = 0x2800
    VMCS_GUEST_IA32_DEBUGCTL = 0x2802
    VMCS_GUEST_IA32_PAT = 0x2804
    VMCS_GUEST_IA32_EFER = 0x2806
    VMCS_GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808
    VMCS_GUEST_PDPTE0 = 0x280A
    VMCS_GUEST_PDPTE1 = 0x280C
    VMCS_GUEST_PDPTE2 = 0x280E
    VMCS_GUEST_PDPTE3 = 0x2810
    VMCS_GUEST_IA32_BNDCFGS = 0x2812
    VMCS_GUEST_IA32_RTIT_CTL = 0x2814
    VMCS_GUEST_IA32_LBR_CTL = 0x2816
    VMCS_GUEST_IA32_PKRS = 0x2818
    # B.2.4 64-bit host-state fields
    VMCS_HOST_IA32_PAT = 0x2C00
    VMCS_HOST_IA32_EFER = 0x2C02
    VMCS_HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04
    VMCS_HOST_IA32_PKRS = 0x2C06

    # B.3.1 32-bit control fields
    VMCS_CTRL_PIN_BASED_VM_EXECUTION_CONTROLS = 0x4000
    VMCS_CTRL_PROCESSOR_BASED_VM_EXECUTION_CONTROLS = 0x4002
    VMCS_CTRL_EXCEPTION_BITMAP = 0x4004
    VMCS_CTRL_PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    VMCS_CTRL_PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    VMCS_CTRL_CR3_TARGET_COUNT = 0x400A
    VMCS_CTRL_VMEXIT_CONTROLS = 0x400C
    VMCS_CTRL_VMEXIT_MSR_STORE_COUNT = 0x400E
    VMCS_CTRL_VMEXIT_MSR_LOAD_COUNT = 0x4010
    VMCS_CTRL_VMENTRY_CONTROLS = 0x4012
    VMCS_CTRL_VMENTRY_MSR_LOAD_COUNT = 0x4014
    VMCS_CTRL_VMENTRY_INTERRUPTION_INFORMATION = 0x4016
    VMCS_CTRL_VMENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VMCS_CTRL_VMENTRY_INSTRUCTION_LENGTH = 0x401A
    VMCS_CTRL_TPR_THRESHOLD = 0x401C
    VMCS_CTRL_SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS = 0x401E
    VMCS_CTRL_PLE_GAP = 0x4020
    VMCS_CTRL_PLE_WINDOW = 0x4022
    VMCS_CTRL_INSTRUCTION_TIMEOUT_CONTROL = 0x4024
    # B.3.2 32-bit read-only data fields
    VMCS_VM_INSTRUCTION_ERROR = 0x4400
    VMCS_EXIT_REASON = 0x4402
    VMCS_VMEXIT_INTERRUPTION_INFORMATION = 0x4404
    VMCS_VMEXIT_INTERRUPTION_ERROR_CODE = 0x4406
    VMCS_IDT_VECTORING_INFORMATION = 0x4408
    VMCS_IDT_VECTORING_ERROR_CODE = 0x440A
    VMCS_VMEXIT_INSTRUCTION_LENGTH = 0x440C
    VMCS_VMEXIT_INSTRUCTION_INFO = 0x440E
    # B.3.3 32-bit guest-state fields
    VMCS_GUEST_ES_LIMIT = 0x4800
    VMCS_GUEST_CS_LIMIT = 0x4802
    VMCS_GUEST_SS_LIMIT = 0x4804
    VMCS_GUEST_DS_LIMIT = 0x4806
    VMCS_GUEST_FS_LIMIT = 0x4808
    VMCS_GUEST_GS_LIMIT = 0x480A
    VMCS_GUEST_LDTR_LIMIT = 0x480C
    VMCS_GUEST_TR_LIMIT = 0x480E
    VMCS_GUEST_GDTR_LIMIT = 0x4810
    VMCS_GUEST_IDTR_LIMIT = 0x4812
    VMCS_GUEST_ES_ACCESS_RIGHTS = 0x4814
    VMCS_GUEST_CS_ACCESS_RIGHTS = 0x4816
    VMCS_GUEST_SS_ACCESS_RIGHTS = 0x4818
    VMCS_GUEST_DS_ACCESS_RIGHTS = 0x481A
    VMCS_GUEST_FS_ACCESS_RIGHTS = 0x481C
    VMCS_GUEST_GS_ACCESS_RIGHTS = 0x481E
    VMCS_GUEST_LDTR_ACCESS_RIGHTS = 0x4820
    VMCS_GUEST_TR_ACCESS_RIGHTS = 0x4822
    VMCS_GUEST_INTERRUPTIBILITY_STATE = 0x4824
    VMCS_GUEST_ACTIVITY_STATE = 0x4826
    VMCS_GUEST_SMBASE = 0x4828
    VMCS_GUEST_IA32_SYSENTER_CS = 0x482A
    VMCS_GUEST_VMX_PREEMPTION_TIMER_VALUE = 0x482E
    # B.3.4 32-bit host-state field
    VMCS_HOST_IA32_SYSENTER_CS = 0x4C00

    # B.4.1 natural-width control fields
    VMCS_CTRL_CR0_GUEST_HOST_MASK = 0x6000
    VMCS_CTRL_CR4_GUEST_HOST_MASK = 0x6002
    VMCS_CTRL_CR0_READ_SHADOW = 0x6004
    VMCS_CTRL_CR4_READ_SHADOW = 0x6006
    VMCS_CTRL_CR3_TARGET_VALUE_0 = 0x6008
    VMCS_CTRL_CR3_TARGET_VALUE_1 = 0x600A
    VMCS_CTRL_CR3_TARGET_VALUE_2 = 0x600C
    VMCS_CTRL_CR3_TARGET_VALUE_3 = 0x600E
    # B.4.2 natural-width read-only data fields
    VMCS_EXIT_QUALIFICATION = 0x6400
    VMCS_IO_RCX = 0x6402
    VMCS_IO_RSI = 0x6404
    VMCS_IO_RDI = 0x6406
    VMCS_IO_RIP = 0x6408
    VMCS_GUEST_LINEAR_ADDRESS = 0x640A
    # B.4.3 natural-width guest-state fields
    VMCS_GUEST_CR0 = 0x6800
    VMCS_GUEST_CR3 = 0x6802
    VMCS_GUEST_CR4 = 0x6804
    VMCS_GUEST_ES_BASE = 0x6806
    VMCS_GUEST_CS_BASE = 0x6808
    VMCS_GUEST_SS_BASE = 0x680A
    VMCS_GUEST_DS_BASE = 0x680C
    VMCS_GUEST_FS_BASE = 0x680E
    VMCS_GUEST_GS_BASE = 0x6810
    VMCS_GUEST_LDTR_BASE = 0x6812
    VMCS_GUEST_TR_BASE = 0x6814
    VMCS_GUEST_GDTR_BASE = 0x6816
    VMCS_GUEST_IDTR_BASE = 0x6818
    VMCS_GUEST_DR7 = 0x681A
    VMCS_GUEST_RSP = 0x681C
    VMCS_GUEST_RIP = 0x681E
    VMCS_GUEST_RFLAGS = 0x6820
    VMCS_GUEST_PENDING_DEBUG_EXCEPTIONS = 0x6822
    VMCS_GUEST_IA32_SYSENTER_ESP = 0x6824
    VMCS_GUEST_IA32_SYSENTER_EIP = 0x6826
    VMCS_GUEST_IA32_S_CET = 0x6828
    VMCS_GUEST_SSP = 0x682A
    VMCS_GUEST_IA32_INTERRUPT_SSP_TABLE_ADDR = 0x682C
    # B.4.4 natural-width host-state fields
    VMCS_HOST_CR0 = 0x6C00
    VMCS_HOST_CR3 = 0x6C02
    VMCS_HOST_CR4 = 0x6C04
    VMCS_HOST_FS_BASE = 0x6C06
    VMCS_HOST_GS_BASE = 0x6C08
    VMCS_HOST_TR_BASE = 0x6C0A
    VMCS_HOST_GDTR_BASE = 0x6C0C
    VMCS_HOST_IDTR_BASE = 0x6C0E
    VMCS_HOST_IA32_SYSENTER_ESP = 0x6C10
    VMCS_HOST_IA32_SYSENTER_EIP = 0x6C12
    VMCS_HOST_RSP = 0x6C14
    VMCS_HOST_RIP = 0x6C16
    VMCS_HOST_IA32_S_CET = 0x6C18
    VMCS_HOST_SSP = 0x6C1A
    VMCS_HOST_IA32_INTERRUPT_SSP_TABLE_ADDR = 0x6C1C


class FieldWidth(IntEnum):
    """Bits 14:13 of a field encoding (SDM 25.11.2)."""

    BITS16 = 0
    BITS64 = 1
    BITS32 = 2
    NATURAL = 3


class FieldGroup(IntEnum):
    """Bits 11:10 of a field encoding (SDM 25.11.2)."""

    CONTROL = 0
    EXIT_INFO = 1
    GUEST = 2
    HOST = 3


_RESERVED_ENCODING_BITS = 0xFFFF_8000 | 1 << 12
_WIDTH_BITS = {FieldWidth.BITS16: 16, FieldWidth.BITS64: 64, FieldWidth.BITS32: 32, FieldWidth.NATURAL: 64}


def _check(field: int) -> int:
    if field & _RESERVED_ENCODING_BITS or field < 0:
        raise ValueError(f"{field:#x} is not a VMCS field encoding (reserved bits set, SDM 25.11.2)")
    return field


def field_width_type(field: int) -> FieldWidth:
    """The width class of an encoding, from bits 14:13."""
    return FieldWidth((_check(field) >> 13) & 3)


def field_width(field: int) -> int:
    """Bits accessed through an encoding: 16, 32 or 64.

    Natural-width fields are 64 bits on processors that support Intel 64
    (SDM 25.11.2); the high-access encoding of a 64-bit field (bit 0 set)
    accesses 32 bits. Use :func:`field_width_type` to tell natural from 64-bit.
    """
    width = field_width_type(field)
    if width is FieldWidth.BITS64 and field & 1:
        return 32
    return _WIDTH_BITS[width]


def field_group(field: int) -> FieldGroup:
    """The field's type from bits 11:10: control, read-only exit information, guest or host state."""
    return FieldGroup((_check(field) >> 10) & 3)


def field_index(field: int) -> int:
    """The index from bits 9:1 (reported as a maximum by IA32_VMX_VMCS_ENUM, SDM A.9)."""
    return (_check(field) >> 1) & 0x1FF


def is_read_only(field: int) -> bool:
    """True for the read-only data (VM-exit information) fields (SDM 25.9)."""
    return field_group(field) is FieldGroup.EXIT_INFO


def high_encoding(field: int) -> int:
    """The encoding that accesses bits 63:32 of a 64-bit field (access type 1, SDM 25.11.2)."""
    if field_width_type(field) is not FieldWidth.BITS64:
        raise ValueError(f"{field:#x} is not a 64-bit field; only those have a high access encoding")
    return field | 1


AR_UNUSABLE = 1 << 16
"""Segment unusable bit of the access-rights format (SDM 25.4.1)."""


def access_rights_from_segment(
    type: int, s: int, dpl: int, present: int, avl: int, l: int, db: int, g: int, unusable: int
) -> int:
    """Pack ``struct kvm_segment`` attributes into the VMX access-rights format.

    SDM 25.4.1, table "Format of Access Rights": segment type 3:0, S 4,
    DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15, segment unusable 16.
    """
    return (
        (type & 0xF)
        | (s & 1) << 4
        | (dpl & 3) << 5
        | (present & 1) << 7
        | (avl & 1) << 12
        | (l & 1) << 13
        | (db & 1) << 14
        | (g & 1) << 15
        | (unusable & 1) << 16
    )


def access_rights_to_fields(ar: int) -> dict[str, int]:
    """Unpack VMX access rights into ``struct kvm_segment`` attribute names (SDM 25.4.1)."""
    return {
        "type": ar & 0xF,
        "s": (ar >> 4) & 1,
        "dpl": (ar >> 5) & 3,
        "present": (ar >> 7) & 1,
        "avl": (ar >> 12) & 1,
        "l": (ar >> 13) & 1,
        "db": (ar >> 14) & 1,
        "g": (ar >> 15) & 1,
        "unusable": (ar >> 16) & 1,
    }
