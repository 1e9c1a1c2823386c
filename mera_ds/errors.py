"""The errors users see: a single line naming the file, field, shard or tensor at fault."""


class MeraError(Exception):
    """Bad input (config, shard, checkpoint, URL). The CLI prints it as one line and exits 2.
    Running it again gives the same error, so nothing retries it."""


class RankFailure(MeraError):
    """A training rank lost its peers (a collective failed or timed out: a peer process died, or
    its node). Not the input's fault: a job failing with it is restarted from its checkpoint."""


def retryable(e: BaseException) -> bool:
    """Whether an error of a step's process may go away when it runs again: anything but bad
    input (a worker killed, a lost peer, an unexpected crash)."""
    return isinstance(e, RankFailure) or not isinstance(e, MeraError)
