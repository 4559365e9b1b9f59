"""The command line starts without torch or pyro: ``--help``, every subcommand's ``--help`` and
``models`` import them lazily (issue 14 part 4).  Run in a fresh interpreter, not timed."""

import subprocess
import sys

import pytest

from pyro_dvae.registry import REGISTRY

from pyro_dvae.cli import cli

#: the top-level help, the model list and every subcommand's --help
COMMANDS = [["--help"], ["models"]] + [[name, "--help"] for name in sorted(cli.commands)]

PROBE = """
import sys
from pyro_dvae.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "pyro", "numpy", "scipy", "librosa") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
raise SystemExit(code)
"""


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_cli_does_not_import_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY=", out.stdout


def test_registry_guide_names_match_the_guide_classes():
    """The names listed without importing (guide_names) are the keys of the imported guide dicts."""
    for name, entry in REGISTRY.items():
        guides = entry.guides
        assert tuple(guides) == entry.guide_names, name
        assert all(cls.name == key for key, cls in guides.items()), name


def test_import_pyro_dvae_is_lazy():
    probe = ("import sys, pyro_dvae; print('torch' in sys.modules); pyro_dvae.DVAE; "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
