import sys

from textdiffusion.cli.main import main

sys.exit(main())
