import sys

from pyflowmap.cli import main

sys.exit(main())
