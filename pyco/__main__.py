import sys

from pyco.cli import main

sys.exit(main())
