"""`python -m steerguard`: the command line."""
from .cli import main

main()
