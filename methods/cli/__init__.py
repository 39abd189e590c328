"""The `vdistill` command line: argument parsing (`main.py`) over what each command does (`commands.py`)."""
