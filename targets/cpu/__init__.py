"""The LLVM CPU backend (x86 AVX2/AVX-512, aarch64 NEON), a one-way stack, bottom up:

* :mod:`.isa`: float lanes, the integer dot-product ISAs, register budgets;
* :mod:`.schedule`, :mod:`.compute`: schedule and TE helpers every kernel uses;
* :mod:`.kernels`: one module per kernel family, compute + schedule + its rule;
* :mod:`.rewrites`: Relax rewrites and legalizers that emit the kernels;
* :mod:`.rules`: the default schedules as an ordered rule list;
* :mod:`.pipeline`: the Relax phase lists x86 and arm targets run.

A module imports only from the layers below it.
"""
