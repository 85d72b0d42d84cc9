"""`python -m kanmon` is the `kanmon` command."""

from kanmon.quick import main

main()
