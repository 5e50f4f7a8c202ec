"""Which devices this machine has (imports TVM; :mod:`.spec` asks only when it must)."""

from __future__ import annotations

import tvm


def cuda_present() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


def detected_cuda_arch() -> str | None:
    if not cuda_present():
        return None
    try:
        return "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    except Exception:  # noqa: BLE001
        return None
