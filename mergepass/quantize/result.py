"""What an int8 engine reports back."""


class QuantizedGraph:
    """What quantization produced: the converted graph and the linears kept in fp32."""

    def __init__(self, module, kept_fp32, mode):
        self.module, self.kept_fp32, self.mode = module, kept_fp32, mode
