"""Imported by nobody: a queue entry naming it must never import it."""

import os
from pathlib import Path

Path(os.environ["POLITE_CANARY_DIR"], "imported").write_text("canary_module was imported")


class CanaryRequest:
    pass
