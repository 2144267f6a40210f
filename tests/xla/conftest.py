"""XLA tests run in .venv-xla (torch 2.9 + torch-xla 2.9) on XLA:CPU, one device.

XLA:CPU collectives act on the local process only, so nothing here is distributed:
the distributed features are proven on gloo (tests/dist).
"""

import importlib.util
import os

if importlib.util.find_spec("torch_xla") is None:
    if os.environ.get("TRNTRAIN_REQUIRE_XLA") == "1":
        raise RuntimeError("TRNTRAIN_REQUIRE_XLA=1 but torch_xla does not import here")
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch_xla

    # The XLA device must exist before any eager backward runs in this process.
    torch_xla.device()


def pytest_collection_modifyitems(items):
    """Forked gloo tests first: a child forked after this process ran an XLA backward
    inherits autograd's threads and fails, whatever order the files are given in."""
    items.sort(key=lambda item: "distributed" not in getattr(item, "fixturenames", ()))
