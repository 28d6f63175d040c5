"""The one exception hierarchy of desanet.

Every error a user can cause or meet is a `DesanetError` whose message a
village operator can act on. Children say which part of the system refused.
"""


class DesanetError(Exception):
    """Base of every error desanet raises on purpose."""


class ConfigError(DesanetError):
    """The configuration or subscribers file is invalid (message names file, line, field)."""


class ValidationError(DesanetError):
    """An input value (prefix, rate, size, plan) is invalid; nothing was applied."""


class DatapathError(DesanetError):
    """The eBPF datapath could not be compiled, attached, provisioned or read."""


class ShaperError(DesanetError):
    """The HTB tree could not be planned or applied."""


class StreamError(DesanetError):
    """The usage stream, its journal or the replay endpoint failed."""


class ControlError(DesanetError):
    """A control request was refused."""


class StateError(DesanetError):
    """A durable state file (control state, slot table) is damaged or cannot be written."""
