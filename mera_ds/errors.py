"""The one error type users see: a single line naming the file, field, shard or tensor at fault."""


class MeraError(Exception):
    """Bad input (config, shard, checkpoint, URL). The CLI prints it as one line and exits 2."""
