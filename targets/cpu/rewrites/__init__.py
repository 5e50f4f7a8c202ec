"""Relax rewrites of the CPU pipeline, small named passes: the QDQ -> integer-kernel rewrite
(:mod:`.qdq_conv`), the requantize and residual folds (:mod:`.requant_fold`,
:mod:`.residual_fold`), and the legalizers of float convolutions (:mod:`.float_conv`),
quantize (:mod:`.quantize_legalizer`) and fast math (:mod:`.fast_math`)."""
