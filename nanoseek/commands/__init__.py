"""The `nanoseek <command>` modules, one per command: `add_arguments(parser)` declares the flags and `run(args)` turns
them into the library's typed config (nanoseek.train, nanoseek.export, ...) and calls it.

Only nanoseek/cli.py imports these modules; they never import each other (the flags several of them share live in
_flags.py, which is not a command).
"""
