"""Real QEMU guests for bench_vm.py: a Debian guest kernel, an initramfs whose /init touches the
guest's RAM, and the host-side view of the guest's RAM.

Built once and cached in /var/tmp/hugepaged-vm (the kernel from Debian's linux-image package,
fetched with `apt-get download`, extracted with dpkg-deb; /init from bench/apps/guest_init.c,
`gcc -static`; the initramfs written here as a newc cpio: no cpio tool needed).

This machine's /dev/kvm is PVM without VMX/SVM and an unmodified guest kernel fails under it, so
the guests run under TCG (`-accel tcg`): what the host does with the guest's RAM (faults,
collapses, coverage) is real, the guest's own speed is not.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CACHE = Path("/var/tmp/hugepaged-vm")
INIT_SRC = Path(__file__).resolve().parents[1] / "apps" / "guest_init.c"
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
HPAGE = 2 << 20


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 1) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def write_initramfs(init: bytes, path: Path) -> None:
    """A newc cpio with /dev, /dev/console, /proc and /init (the static binary)."""
    out = (_cpio_entry("dev", 0o040755, ino=1) +
           _cpio_entry("dev/console", 0o020600, rdev=(5, 1), ino=2) +
           _cpio_entry("proc", 0o040555, ino=3) +
           _cpio_entry("init", 0o100755, init, ino=4) +
           _cpio_entry("TRAILER!!!", 0, ino=0))
    path.write_bytes(out)


def guest_files(log=print) -> tuple[Path, Path]:
    """(vmlinuz, initramfs), built on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    kernels = sorted(glob.glob(str(CACHE / "boot" / "vmlinuz-*")))
    if not kernels:
        pkg = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                             text=True).stdout
        m = re.search(r"Depends: (linux-image-[0-9][^\s]*)", pkg)
        if not m:
            raise RuntimeError("apt-cache knows no linux-image-amd64 (run apt-get update)")
        log(f"  fetching {m.group(1)} (apt-get download)")
        subprocess.run(["apt-get", "download", m.group(1)], cwd=CACHE, check=True,
                       capture_output=True)
        deb = sorted(glob.glob(str(CACHE / f"{m.group(1)}_*.deb")))[-1]
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(CACHE), "--wildcards", "./boot/vmlinuz-*"],
                       stdin=tar.stdout, check=True)
        tar.wait()
        kernels = sorted(glob.glob(str(CACHE / "boot" / "vmlinuz-*")))
    init = CACHE / "init"
    if not init.exists() or init.stat().st_mtime < INIT_SRC.stat().st_mtime:
        subprocess.run(["gcc", "-static", "-O2", "-o", str(init), str(INIT_SRC)], check=True)
    initrd = CACHE / "initramfs.cpio"
    write_initramfs(init.read_bytes(), initrd)
    return Path(kernels[-1]), initrd


BACKENDS = ("anon", "memfd", "shmfile")
SHM_ROOT = "/dev/shm"


class Guest:
    """One qemu-system-x86_64 under TCG with `mib` of RAM: `backend` anon (QEMU's own anonymous
    mapping), memfd (`-object memory-backend-memfd`: shared memory, mapped by QEMU 7.2 at a 4
    KiB-aligned address) or shmfile (`-object memory-backend-file` with `share=on,align=2M`
    and mem-path a directory of our own under /dev/shm: QEMU creates its file there and
    unlinks it at once, so it is shared memory with the memfd's rules, shmem_anon_vm_ops,
    mapped 2 MiB-aligned).

    Killed (SIGKILL to its process group) by close(), whatever happened; close() also removes
    the /dev/shm directory (QEMU's file is gone with QEMU's last reference to it)."""

    def __init__(self, name: str, mib: int, kernel: Path, initrd: Path, workdir: str,
                 backend: str = "anon", cpu: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {BACKENDS}")
        self.name, self.mib, self.backend = name, mib, backend
        self.shm_dir: str | None = None
        self.console = os.path.join(workdir, f"guest-{name}.log")
        cmd = [QEMU, "-accel", "tcg", "-m", f"{mib}M", "-smp", "1", "-nographic",
               "-nodefaults", "-no-reboot", "-serial", f"file:{self.console}",
               "-kernel", str(kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 panic=-1 quiet loglevel=3 touch_margin_mib=24"]
        if backend == "memfd":
            cmd += ["-object", f"memory-backend-memfd,id=ram,size={mib}M",
                    "-machine", "pc,memory-backend=ram"]
        elif backend == "shmfile":
            self.shm_dir = tempfile.mkdtemp(prefix=f"hugepaged-vm-{name}-", dir=SHM_ROOT)
            cmd += ["-object", f"memory-backend-file,id=ram,size={mib}M,"
                    f"mem-path={self.shm_dir},share=on,align=2M",
                    "-machine", "pc,memory-backend=ram"]
        else:
            cmd += ["-machine", "pc"]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self.t_start = 0.0
        self.touched_at: float | None = None

    def start(self) -> Guest:
        Path(self.console).write_text("")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        """qemu's own pid (taskset execs it in place)."""
        return self.proc.pid

    def console_text(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.console).read_text(errors="replace")
        return ""

    def wait_touched(self, timeout: float) -> float:
        """Seconds from start until /init said it touched the RAM."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "guest-init: touched" in self.console_text():
                self.touched_at = time.monotonic()
                return self.touched_at - self.t_start
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"qemu {self.name} exited {self.proc.returncode}: {err} "
                                   f"console: {self.console_text()[-800:]}")
            time.sleep(0.2)
        raise RuntimeError(f"guest {self.name} did not touch its RAM in {timeout} s; "
                           f"console: {self.console_text()[-800:]}")

    def ram_range(self) -> tuple[int, int]:
        """The host mapping of the guest's RAM: the smallest VMA of at least `mib` MiB
        (anonymous), or the memfd's or the /dev/shm file's mapping."""
        want = self.mib << 20
        best = None
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5] if len(parts) > 5 else ""
                if self.backend == "memfd" and "/memfd:" not in path:
                    continue  # "/memfd:memory-backend-memfd"
                if self.backend == "shmfile" and not path.startswith(self.shm_dir + "/"):
                    continue  # "/dev/shm/hugepaged-vm-B-.../qemu_back_mem.ram.XXXXXX (deleted)"
                if hi - lo >= want and (best is None or hi - lo < best[1] - best[0]):
                    best = (lo, hi)
        if best is None:
            raise RuntimeError(f"no {self.mib} MiB mapping in qemu {self.pid}'s maps")
        return best

    def close(self) -> None:
        try:
            self._kill()
        finally:
            if self.shm_dir is not None:
                shutil.rmtree(self.shm_dir, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(20)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def stop_and_wait_freed(guest: Guest, timeout: float = 30.0) -> float:
    """Kill a guest and wait until its process is gone (its memory freed); seconds taken."""
    t0 = time.monotonic()
    guest.close()
    while os.path.exists(f"/proc/{guest.pid}") and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return time.monotonic() - t0


_unused = threading  # (kept for callers that read the console on a thread)
