import sys

from lowbit.cli.main import main

sys.exit(main())
