"""Errors chainwatch raises on purpose; each carries a one-line message for users."""


def first_line(exc: BaseException) -> str:
    """An error's first line (polars and subprocess errors add hint lines after it); its
    type's name when the message is empty, which `str(exc).splitlines()[0]` fails on."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ChainwatchError(Exception):
    """Base class: anything the CLI may print as one line instead of a traceback."""


class InvalidRecord(ChainwatchError):
    """A message on the bus is not a valid chainwatch record (poison message)."""


class ConfigError(ChainwatchError):
    """A setting or flag is wrong (bad URL scheme, missing value...)."""


class RpcError(ChainwatchError):
    """The node could not be reached or answered with an error. Never holds the URL."""


class MalformedRpcPayload(RpcError):
    """The node answered, but the payload lacks a field or has a wrong type."""


class RpcMethodUnsupported(RpcError):
    """The node does not offer this method (admin_*, txpool_* are often disabled)."""


class BusError(ChainwatchError):
    """The bus (Kafka) could not be reached or did not acknowledge a publish."""
