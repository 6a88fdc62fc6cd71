"""Layer 2: memory. Reversible backprop trains, under a memory limit, a network that autograd cannot;
`import dhdnn` backs large CPU tensors with huge pages unless the user opted out.

A child process caps its own address space (``RLIMIT_AS``) at what it uses after start-up plus
400 MiB, then trains H2 with 2048 layers, dim 64, batch 512 for one epoch. Autograd keeps every
layer's state (~1 GiB here) and fails to allocate; reversible backprop keeps a few ``(B, m)``
buffers and finishes.
"""
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
from dhdnn.config import load_config
from dhdnn.run import train_from_config
mode, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, ["model.arch=H2", "model.dim=64", "model.layers=2048", "model.h=0.05", "model.init_std=0.3",
                         "data.name=double_moons", "data.n_samples=1024", "train.batch_size=512", "train.epochs=1",
                         f"run.backprop={mode}", f"run.out_dir={out}", "run.progress=false"])
vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
try:
    print("finished", train_from_config(cfg)["epochs"])
except (MemoryError, RuntimeError) as e:
    print("out of memory:", str(e).splitlines()[0][:200])
    sys.exit(9)
"""


@pytest.mark.parametrize("mode,code", [("autograd", 9), ("reversible", 0)])
def test_reversible_backprop_fits_where_autograd_does_not(tmp_path, mode, code):
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == code, p.stdout + p.stderr[-2000:]
    assert ("finished 1" if code == 0 else "can't allocate memory") in p.stdout


@pytest.mark.parametrize("preset", [None, "0"])
def test_import_turns_on_huge_pages_unless_the_user_chose(preset):
    """``import dhdnn`` sets PyTorch's THP_MEM_ALLOC_ENABLE before torch allocates, so a 64 MiB
    tensor lands on transparent huge pages where the kernel offers them; a user's own setting wins."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import os, dhdnn, torch\nx = torch.ones(16 << 20)\n"
            "f = '/proc/self/smaps_rollup'\n"
            "huge = sum(int(l.split()[1]) for l in open(f) if l.startswith('AnonHugePages')) if os.path.exists(f) else -1\n"
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], huge)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value, huge_kib = out.stdout.split()
    assert value == ("1" if preset is None else preset)
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:  # no THP in this kernel: only the environment can be checked
        return
    if int(huge_kib) < 0:  # no smaps_rollup to read the pages from
        return
    if preset is None and "[never]" not in thp:
        assert int(huge_kib) >= 32 << 10  # most of the 64 MiB tensor is on 2 MiB pages
    elif "[madvise]" in thp:
        assert int(huge_kib) == 0  # opted out: PyTorch does not ask for huge pages
