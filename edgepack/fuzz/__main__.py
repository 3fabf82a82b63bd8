"""python -m edgepack.fuzz: see edgepack/fuzz/__init__.py."""

import sys

from . import main

sys.exit(main())
