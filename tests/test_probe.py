"""MADV_COLLAPSE is probed, not inferred from the kernel's version: hugepaged tries
process_madvise(MADV_COLLAPSE) on a page of its own at start and names the exact errno.

The failures are real ones: a seccomp filter (what systemd's SystemCallFilter= installs)
makes the kernel answer process_madvise with ENOSYS, as a kernel without the syscall does,
or EINVAL for advice 25 only, as a kernel without MADV_COLLAPSE does, or EPERM.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import subprocess
import sys

import pytest

from hugepaged.kernel.madvise import probe_collapse
from kit.daemon_runner import hugepaged_cmd

from .marks import kernel_test

PMD = 2 << 20
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
NR_PROCESS_MADVISE = 440
# classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h)
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn))]


def refusing(err: int, advice: int | None = None):
    """A preexec_fn that installs a seccomp filter answering process_madvise with `err`
    (only for `advice` when given: args[3], at offset 16 + 3 * 8 of seccomp_data)."""
    arch = AUDIT_ARCH[platform.machine()]
    code = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 0, 99, arch), (LD_W_ABS, 0, 0, 0),
            (JEQ_K, 0, 99, NR_PROCESS_MADVISE)]
    if advice is not None:
        code += [(LD_W_ABS, 0, 0, 40), (JEQ_K, 0, 99, advice)]
    code.append((RET_K, 0, 0, RET_ERRNO | err))
    allow = len(code)
    code.append((RET_K, 0, 0, RET_ALLOW))
    # jf=99 means "to the allow instruction": offsets are relative to the next one
    insns = [_Insn(c, jt, (allow - i - 1) if jf == 99 else jf, k)
             for i, (c, jt, jf, k) in enumerate(code)]

    def install() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        array = (_Insn * len(insns))(*insns)
        prog = _Prog(len(insns), ctypes.cast(array, ctypes.POINTER(_Insn)))
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            os._exit(99)
    return install


needs_arch = pytest.mark.skipif(platform.machine() not in AUDIT_ARCH,
                                reason=f"seccomp arch constant not known for "
                                       f"{platform.machine()}")


@kernel_test
def test_the_probe_collapses_a_page_of_its_own():
    """On this machine the call is there: the collapse succeeds, or fails only as a
    collapse may (no free huge page), never as an unknown advice."""
    assert probe_collapse(PMD) in (0, errno.ENOMEM, errno.EAGAIN, errno.EBUSY)


def _thp_disabled() -> None:
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE, as a parent may leave it


@kernel_test
def test_the_probe_sees_through_thp_disabled_for_itself_and_puts_it_back():
    code = ("import ctypes; from hugepaged.kernel.madvise import probe_collapse; "
            f"print(probe_collapse({PMD}), ctypes.CDLL(None).prctl(42, 0, 0, 0, 0))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, preexec_fn=_thp_disabled)
    assert r.returncode == 0, r.stderr
    result, still_disabled = r.stdout.split()
    assert int(result) in (0, errno.ENOMEM, errno.EAGAIN, errno.EBUSY), r.stdout
    assert still_disabled == "1"  # LruDrain lifts it later, and logs that it did


@needs_arch
@kernel_test
@pytest.mark.parametrize(("err", "advice", "words"), [
    (errno.ENOSYS, None, "ENOSYS: no process_madvise syscall"),
    (errno.EINVAL, 25, "EINVAL: MADV_COLLAPSE is not an advice this kernel knows"),
    (errno.EPERM, None, "EPERM: not permitted"),
])
def test_a_refused_probe_is_one_line_naming_the_errno(err, advice, words):
    """`hugepaged collapse` refuses with exit 4 and the errno before it touches the process
    (here the test itself, whose memory stays as it is)."""
    r = subprocess.run(hugepaged_cmd("collapse", "--pid", str(os.getpid())),
                       capture_output=True, text=True, timeout=60, cwd="/",
                       stdin=subprocess.DEVNULL, preexec_fn=refusing(err, advice))
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("hugepaged: process_madvise(MADV_COLLAPSE) on a page of "
                               "hugepaged's own failed with ") and words in r.stderr, r.stderr
