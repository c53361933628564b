"""`--verbose` lets the library notices fmtune keeps quiet through (the core's CLI)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_verbose_lets_library_notices_through():
    import logging

    from fmtune.cli import QUIET_LOGGERS

    script = ("import logging, sys\nfrom fmtune.cli import _quiet_libraries\n"
              "_quiet_libraries(sys.argv[1:])\n"
              "print([logging.getLogger(n).getEffectiveLevel() for n in %r])" % (QUIET_LOGGERS,))
    for flags, level in ((["--verbose"], logging.WARNING), ([], logging.ERROR)):
        res = subprocess.run([sys.executable, "-c", script, *flags], capture_output=True,
                             text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == [level] * len(QUIET_LOGGERS), flags
