"""``python -m prefopt VERB ...`` (and ``accelerate launch -m prefopt VERB ...``): the CLI."""
import sys

from prefopt.cli import main

sys.exit(main())
