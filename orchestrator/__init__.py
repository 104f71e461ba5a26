"""The sweep driver: CLI subcommands, building the Tuner, resources, resume, the comparison report."""
