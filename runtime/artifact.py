"""The compiled artifact: a folder holding

* ``model.so``      -- the TVM library (Relax VM executable, weights bound as constants);
* ``model.onnx``    -- the rewritten graph, runnable in onnxruntime;
* ``manifest.json`` -- format marker, inputs/outputs (names, shapes, dtypes), target, versions,
  source sha256 and the sha256 of every other file of the artifact;
* ``report.json``   -- the compile report (passes, statistics, timings);
* ``plots/``        -- optional figures of the passes.

It is written into a staging folder beside the destination and swapped into place at the end
(``renameat2(RENAME_EXCHANGE)`` where the file system has it), under a lock on the destination's
parent folder, so a failed, killed or concurrent compile never leaves a half-written artifact
at the destination; staging folders of processes that died are removed by the next compile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from edgec.core.errors import EdgecError, one_line

MANIFEST = "manifest.json"
LIBRARY = "model.so"
ONNX = "model.onnx"
REPORT = "report.json"
PLOTS = "plots"
FORMAT = "edgec-artifact/1"
# Everything an artifact folder may hold; a folder with anything else is not ours.
ARTIFACT_FILES = frozenset({MANIFEST, LIBRARY, ONNX, REPORT})
# Test hook: called with a stage name ("staged", "locked", "swapped") during the swap.
_HOOK = None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of an artifact folder except the manifest (``plots/x.png`` keys)."""
    out = {}
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST:
            out[rel] = sha256_file(p)
    return out


def is_artifact(path: Path) -> bool:
    """An edgec artifact: its manifest carries edgec's format marker and the folder holds
    nothing but the artifact's own files."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(
            "edgec-artifact/"):
        return False
    try:
        for p in path.iterdir():
            if p.is_symlink():
                return False
            if p.name == PLOTS and p.is_dir():
                if any(q.is_symlink() or not q.is_file() for q in p.iterdir()):
                    return False
            elif p.name not in ARTIFACT_FILES or not p.is_file():
                return False
    except OSError:
        return False
    return True


def resolve_output(out: str | os.PathLike) -> Path:
    """The folder a compile writes: a symlink is followed (the link stays as it is)."""
    if str(out) == "":
        raise EdgecError("empty output path")
    out = Path(out)
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    return Path(os.path.abspath(out))


def check_output_dir(out: Path, force: bool = True) -> None:
    """Refuse an output path that is a file or a non-empty folder other than an artifact, and
    one whose folder cannot be written (before any work is done)."""
    out = resolve_output(out)
    if out.exists():
        if not out.is_dir():
            raise EdgecError(f"output path exists and is not a folder: {out}")
        if any(out.iterdir()) and not is_artifact(out):
            raise EdgecError(f"output folder {out} exists and is not an edgec artifact: "
                             "refusing to overwrite it")
        if not force:
            raise EdgecError(f"output folder {out} exists")
    _check_writable(out.parent)


def _check_writable(folder: Path) -> None:
    """Create (and remove) a staging folder in ``folder`` or, if it does not exist yet, in its
    nearest existing ancestor: the only reliable writability test (root, read-only mounts)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise EdgecError(f"cannot create the output folder: {probe} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgec-probe-", dir=probe))
    except OSError as e:
        raise EdgecError(f"cannot write the output folder in {probe}: "
                         f"{e.strerror or e}") from None


@contextlib.contextmanager
def _locked(fd: int, blocking: bool = True):
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def _dir_lock(folder: Path):
    """An exclusive lock on ``folder`` (flock on the directory itself: nothing left behind)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with _locked(fd):
            yield
    finally:
        os.close(fd)


def _staging_names(out: Path) -> tuple[str, str]:
    return f".{out.name}.tmp-", f".{out.name}.old-"


def remove_stale(out: Path) -> list[str]:
    """Remove staging folders beside ``out`` whose compile died (no process holds their lock);
    a replaced artifact left hidden by a crash mid-swap is put back if ``out`` is missing.
    Call with the parent folder locked. Returns the names removed or restored."""
    tmp_prefix, old_prefix = _staging_names(out)
    done = []
    for p in sorted(out.parent.iterdir()):
        if not (p.name.startswith(tmp_prefix) or p.name.startswith(old_prefix)) or \
                p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live compile holds it
            if p.name.startswith(old_prefix) and not out.exists() and is_artifact(p):
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)
            done.append(p.name)
        finally:
            os.close(fd)
    return done


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out``; an existing ``out`` ends up at ``tmp`` (to be removed). At every
    instant ``out`` is either the old or the new artifact."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _renameat2_exchange(tmp, out):
        return
    # No RENAME_EXCHANGE: two renames; a failure between them puts the old one back, and a
    # crash between them is repaired by the next compile's remove_stale.
    old = Path(tempfile.mkdtemp(prefix=_staging_names(out)[1], dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        if _HOOK:
            _HOOK("between-renames")
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    os.rename(old, tmp)


@contextlib.contextmanager
def staging(out: Path, force: bool = True):
    """Yield a staging folder beside ``out``; on success it replaces ``out`` atomically.

    An existing ``out`` is replaced only if it is empty or an earlier edgec artifact. The
    staging folder is locked (flock) while this process lives, so a later compile can tell
    the leftovers of a killed one from a compile still running, and remove them.
    """
    out = resolve_output(out)
    check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _dir_lock(out.parent):
            remove_stale(out)
            tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_names(out)[0]}{os.getpid()}-",
                                        dir=out.parent))
            tmp_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(tmp_fd, fcntl.LOCK_EX)
    except OSError as e:
        raise EdgecError(f"cannot write the output folder {out}: {e.strerror or e}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        try:
            yield tmp
        except OSError as e:
            raise EdgecError(f"cannot write the artifact in {out.parent}: "
                             f"{e.strerror or e}") from None
        if _HOOK:
            _HOOK("staged")
        try:
            with _dir_lock(out.parent):
                if _HOOK:
                    _HOOK("locked")
                check_output_dir(out, force)  # again: something may have appeared meanwhile
                _swap(tmp, out)
                if _HOOK:
                    _HOOK("swapped")
        except OSError as e:
            raise EdgecError(f"cannot put the artifact in place at {out}: "
                             f"{e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old artifact after a swap
        os.close(tmp_fd)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _bad(path: Path, what: str):
    return EdgecError(f"corrupt {path}: {what}")


def _check_specs(path: Path, manifest: dict, key: str) -> None:
    import numpy as np

    specs = manifest.get(key)
    if not isinstance(specs, list) or not specs and key == "outputs":
        raise _bad(path, f"'{key}' is not a list of tensors")
    for s in specs:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or \
                not isinstance(s.get("shape"), list) or \
                not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                        for d in s["shape"]):
            raise _bad(path, f"bad entry in '{key}': {str(s)[:100]}")
        try:
            np.dtype(s.get("dtype"))
        except TypeError:
            raise _bad(path, f"bad dtype in '{key}': {str(s.get('dtype'))[:40]}") from None


def read_manifest(out: str | os.PathLike) -> dict:
    out = Path(out)
    if not out.is_dir():
        raise EdgecError(f"artifact folder not found: {out}")
    path = out / MANIFEST
    if not path.is_file():
        raise EdgecError(f"not an edgec artifact (no {MANIFEST}): {out}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgecError(f"corrupt {path}: {one_line(e, 200)}") from None
    if not isinstance(manifest, dict):
        raise _bad(path, "not a JSON object")
    if manifest.get("format") != FORMAT:
        raise EdgecError(f"{path}: unknown artifact format {str(manifest.get('format'))[:60]!r}")
    _check_specs(path, manifest, "inputs")
    _check_specs(path, manifest, "outputs")
    for key in ("target", "device"):
        if not isinstance(manifest.get(key), str):
            raise _bad(path, f"'{key}' missing or not a string")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise _bad(path, "'files' is not a map of sha256 digests")
    return manifest


def verify_file(out: Path, manifest: dict, name: str) -> None:
    """The sha256 of ``out/name`` must be the one the manifest records."""
    want = manifest.get("files", {}).get(name)
    if want is None:
        raise EdgecError(f"artifact {out}: the manifest records no sha256 for {name} "
                         "(built by an older edgec, or tampered with): recompile it")
    if sha256_file(out / name) != want:
        raise EdgecError(f"artifact {out}: {name} does not match the sha256 in its manifest "
                         "(modified after the compile): refusing to load it")


ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


def check_library(path: Path, arch: str | None = None) -> None:
    """The library must be a whole 64-bit little-endian ELF shared object (for ``arch`` if
    given): every segment and the section table inside the file. A truncated library would
    otherwise be mapped by the loader and fault (SIGBUS) when touched, not fail cleanly."""
    import struct

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise EdgecError(f"{path} is not a 64-bit little-endian ELF library")
        (etype, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize,
         shnum) = struct.unpack_from("<HHIQQQIHHHHH", head, 16)
        if etype != 3:  # ET_DYN
            raise EdgecError(f"{path} is not a shared library (ELF type {etype})")
        have = ELF_MACHINES.get(machine, f"machine {machine}")
        if arch and have != arch:
            raise EdgecError(f"{path} is a library for {have}, the manifest says {arch}")
        if phentsize < 56 or phoff + phnum * phentsize > size or \
                shoff + shnum * shentsize > size:
            raise EdgecError(f"{path} is truncated ({size} bytes; its headers reach past "
                             "the end)")
        f.seek(phoff)
        table = f.read(phnum * phentsize)
    for i in range(phnum):
        _, _, offset, _, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
        if offset + filesz > size:
            raise EdgecError(f"{path} is truncated ({size} bytes; segment {i} ends at byte "
                             f"{offset + filesz})")
