"""`python -m diary_ws serve`."""

from __future__ import annotations

import sys

from diary_ws.cli import main

sys.exit(main())
