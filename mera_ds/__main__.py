import sys

from mera_ds.cli import main

sys.exit(main())
