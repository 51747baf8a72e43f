import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (not run: this is not a pass)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=__import__("qpeft").functional.cpu_isa_levels())
def cpu_isa(request):
    """Runs the test at each CPU kernel level this machine supports (baseline, avx2, avx512, avx512_bf16: the
    ones it has), restoring the previous cap after."""
    import qpeft

    previous = qpeft.functional.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        qpeft.functional.set_cpu_isa(previous)
