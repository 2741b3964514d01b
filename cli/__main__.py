"""`python -m visbatch.cli` runs the same app as the `visbatch` command."""

from visbatch.cli.main import main

main()
