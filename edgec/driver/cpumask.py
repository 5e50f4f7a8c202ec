"""Run a peer (onnxruntime) as if on a CPU with fewer x86 extensions than this host.

``edgec bench --mcpu haswell`` on an AVX-512 host times edgec's AVX2 code; onnxruntime picks
its kernels from CPUID at load time and would run AVX-512 ones, which no AVX2 machine has.
This module hides extensions from a child process so both sides run what an AVX2 machine
runs: Linux's CPUID faulting (``arch_prctl(ARCH_SET_CPUID, 0)``, CPU flag ``cpuid_fault``)
turns every ``cpuid`` instruction into a SIGSEGV; a preloaded library (built here with the
system C compiler, cached) catches it, executes the real ``cpuid`` with faulting briefly
off, clears the hidden feature bits and steps over the instruction. The library is
preloaded (``LD_PRELOAD``) so the mask holds before any library of the child asks; glibc's
own string functions are told the same through ``GLIBC_TUNABLES``.

Hides only what a CPU family lacks; it cannot add what the host lacks. Only the peer
process is masked -- edgec's side is compiled for the chosen ``-mcpu`` anyway.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgec.core.errors import EdgecError

# (leaf, subleaf, register index 0..3 = eax, ebx, ecx, edx, bit) of each extension to hide.
_AVX512 = [(7, 0, 1, b) for b in (16, 17, 21, 26, 27, 28, 30, 31)] \
    + [(7, 0, 2, b) for b in (1, 6, 11, 12, 14)] + [(7, 0, 3, b) for b in (2, 3, 8, 23)] \
    + [(7, 1, 0, 5)]                                       # avx512_bf16
_AMX = [(7, 0, 3, b) for b in (22, 24, 25)] + [(7, 1, 0, 21)]
_AVX_VNNI = [(7, 1, 0, 4), (7, 1, 0, 23), (7, 1, 3, 4), (7, 1, 3, 5), (7, 1, 3, 10)]

#: What each ``-mcpu`` family lacks that newer x86 hosts have (the post-Haswell extensions
#: that onnxruntime's MLAS dispatches on); glibc's names for the same.
FAMILIES = {
    "haswell": (_AVX512 + _AMX + _AVX_VNNI,
                "-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL,-AVX_VNNI,-AMX_TILE"),
    "skylake-avx512": (_AMX + _AVX_VNNI + [(7, 0, 1, 21)]
                       + [(7, 0, 2, b) for b in (1, 6, 11, 12, 14)]
                       + [(7, 0, 3, 23), (7, 1, 0, 5)], "-AVX_VNNI,-AMX_TILE"),
}
FAMILIES["broadwell"] = FAMILIES["skylake"] = FAMILIES["haswell"]

_C = r"""
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static unsigned masks[N_MASKS][4] = {MASKS};   /* leaf, subleaf, register, bit */

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    unsigned char *ip = (unsigned char *)uc->uc_mcontext.gregs[REG_RIP];
    /* a faulting cpuid is a general protection fault (SI_KERNEL); anything else -- a real
       segfault, perhaps at an unreadable RIP -- dies as it would have */
    if (si->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)uc->uc_mcontext.gregs[REG_RAX];
    unsigned sub = (unsigned)uc->uc_mcontext.gregs[REG_RCX];
    unsigned r[4];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    for (unsigned i = 0; i < N_MASKS; i++)
        if (masks[i][0] == leaf && masks[i][1] == sub) r[masks[i][2]] &= ~(1u << masks[i][3]);
    uc->uc_mcontext.gregs[REG_RAX] = r[0];
    uc->uc_mcontext.gregs[REG_RBX] = r[1];
    uc->uc_mcontext.gregs[REG_RCX] = r[2];
    uc->uc_mcontext.gregs[REG_RDX] = r[3];
    uc->uc_mcontext.gregs[REG_RIP] += 2;
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        static const char msg[] = "edgec cpumask: CPUID faulting refused by the kernel\n";
        write(2, msg, sizeof msg - 1);
        _exit(97);
    }
}
"""


def _cc() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def supported() -> str | None:
    """None when this host can mask CPUID for a child, else why not (one line)."""
    if os.uname().machine not in ("x86_64", "amd64"):
        return "CPUID masking needs an x86-64 host"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo"
    if "cpuid_fault" not in flags.split():
        return "this CPU (or its hypervisor) has no CPUID faulting (flag cpuid_fault)"
    if not _cc():
        return "no C compiler (cc) to build the CPUID mask"
    return None


def library(family: str) -> Path:
    """The preload library hiding what ``family`` lacks (built once, cached)."""
    if family not in FAMILIES:
        raise EdgecError(f"no CPUID mask for -mcpu {family!r} (known: "
                         f"{', '.join(sorted(FAMILIES))})")
    why = supported()
    if why:
        raise EdgecError(f"cannot run the peer as a {family} CPU: {why}")
    masks = FAMILIES[family][0]
    src = _C.replace("N_MASKS", str(len(masks))).replace(
        "{MASKS}", "{" + ", ".join("{%d, %d, %d, %d}" % m for m in masks) + "}")
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("EDGEC_CACHE") or Path.home() / ".cache" / "edgec") / "cpumask"
    lib = cache / f"cpumask-{family}-{key}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    cc = _cc()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        c = Path(tmp) / "cpumask.c"
        c.write_text(src)
        out = Path(tmp) / lib.name
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(c)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise EdgecError(f"building the CPUID mask failed: {res.stderr.strip()[:300]}")
        os.replace(out, lib)                     # atomic: never a half-written library
    return lib


def worker_env(threads: int, cpu: str | None = None) -> dict[str, str]:
    """The environment of a timing worker: ``threads`` threads for TVM and OpenMP, and with
    ``cpu`` the CPUID mask of that family (:func:`child_env`)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TVM_NUM_THREADS=str(threads))
    return child_env(cpu, env) if cpu else env


def child_env(family: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a child that sees a ``family`` CPU."""
    env = dict(os.environ if env is None else env)
    lib = str(library(family))
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    tun = f"glibc.cpu.hwcaps={FAMILIES[family][1]}"
    env["GLIBC_TUNABLES"] = tun + (":" + env["GLIBC_TUNABLES"] if env.get("GLIBC_TUNABLES")
                                   else "")
    return env
