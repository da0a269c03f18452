"""The native module as a shared object: what it exports, and whether its C++
exceptions survive another C++ runtime loaded first.

Found on the GPU machine: its toolchain links libstdc++ statically, and the
module exported that copy's symbols. With numpy (and its libstdc++) imported
first, every error raised from C++ through an ostringstream message crashed
the process. The module now exports ``PyInit__core`` alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from kvttl import _core


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the export list is checked on Linux")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_the_module_exports_no_cxx_symbols():
    out = subprocess.run(["nm", "-DC", "--defined-only", _core.__file__], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split(" ", 2)[2] for line in out.splitlines() if line.count(" ") >= 2]
    assert "PyInit__core" in names
    linker_defined = {"_edata", "_end", "__bss_start", "_init", "_fini"}
    leaked = [n for n in names if n != "PyInit__core" and n not in linker_defined]
    assert not leaked, f"{len(leaked)} more symbols exported, e.g. {leaked[:5]}"


def test_errors_from_cxx_survive_numpy_imported_first():
    code = ("import numpy\n"
            "import kvttl\n"
            "from kvttl.errors import UnknownBlockError\n"
            "try:\n"
            "    kvttl.BlockPool(4).ref_count(99)\n"
            "except UnknownBlockError as e:\n"
            "    print('raised:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "raised: ref_count: block id 99 is outside [0, 4)" in done.stdout
