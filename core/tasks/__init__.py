"""The maths of each subcommand: one module or package per task."""
