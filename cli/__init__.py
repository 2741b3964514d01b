"""visbatch's command line: thin Typer commands over visbatch.core."""
