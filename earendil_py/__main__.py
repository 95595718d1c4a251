import sys

from earendil_py.cli import main

sys.exit(main())
