"""`python -m service.cli ...`: the same CLI as the `flywheel` console script."""

from service.cli import main

main()
