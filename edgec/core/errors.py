"""Errors a user can cause. The CLI prints them as one line and exits 2."""


class EdgecError(Exception):
    """A user-facing error: bad input, bad option, unsupported model."""


class UnsupportedOpError(EdgecError):
    def __init__(self, op_type: str, node_name: str, where: str = "the TVM ONNX frontend"):
        self.op_type = op_type
        self.node_name = node_name
        super().__init__(f"unsupported op '{op_type}' at node '{node_name}' (not handled by {where})")


class PassError(EdgecError):
    """A pass raised or produced an invalid model; names the pass."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}' failed: {message}")


class PassDriftError(EdgecError):
    """--verify found outputs drifting beyond a pass's declared tolerance."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}' drifted beyond its tolerance: {message}")
