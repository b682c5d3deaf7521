import sys
from pathlib import Path

# Test the source tree without installing it (UNMERGE's own suite also installs it with pip).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
