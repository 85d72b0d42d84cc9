"""`python -m kanmon` is the `kanmon` command."""

from kanmon.cli import main

main()
