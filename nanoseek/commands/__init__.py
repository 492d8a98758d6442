"""The `nanoseek` commands: one module each, add_arguments(parser) and run(args); only nanoseek.cli imports them."""
