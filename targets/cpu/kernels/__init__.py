"""CPU kernels, one module per family: the compute (TE), its schedule and its ``RULE`` for the
default-schedule rule list (:mod:`..rules`). Float: :mod:`.packed_conv`, :mod:`.winograd`,
:mod:`.pixel_conv`, :mod:`.row_conv` (depthwise, max pool), :mod:`.matmul`, :mod:`.generic`.
Integer: :mod:`.int8_conv` (and matmul), :mod:`.int8_pixel`, :mod:`.int8_winograd`, on
:mod:`.int8_common` and the tensor intrinsics of :mod:`.int8_intrin`."""
