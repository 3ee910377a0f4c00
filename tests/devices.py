"""The devices a kernel test runs on: the CPU everywhere, a CUDA GPU where there is one (marked `gpu`)."""

import pytest
import torch

CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
