"""The RADIUS dictionary desanet speaks: FreeRADIUS's own dictionary files, read by pyrad.

Every attribute desanet sends or reads is named here by its dictionary name
(Acct-Input-Gigawords, Mikrotik-Rate-Limit, Error-Cause ...): no number in
the code. The files are the ones Debian's freeradius-common installs under
/usr/share/freeradius, so the gateway and the billing server agree on every
code and value name. Only the files desanet needs are read (FreeRADIUS's top
dictionary includes vendor files pyrad cannot parse).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from pyrad.dictionary import Dictionary, ParseError

from desanet.errors import ConfigError

DICTIONARY_DIR = Path("/usr/share/freeradius")
# Read in this order: later files add values to attributes of earlier ones
# (rfc5176 adds Error-Cause values to rfc3576's attribute).
FILES = (
    "dictionary.rfc2865",  # User-Name, NAS-IP-Address, Framed-IP-Address, Calling-Station-Id
    "dictionary.rfc2866",  # Acct-Status-Type, octets, packets, session, terminate cause
    "dictionary.rfc2869",  # Acct-*-Gigawords, Event-Timestamp, Message-Authenticator
    "dictionary.rfc3162",  # Framed-IPv6-Prefix, NAS-IPv6-Address
    "dictionary.rfc3576",  # Error-Cause
    "dictionary.rfc5176",  # more Error-Cause values
    "dictionary.mikrotik",  # Mikrotik-Rate-Limit
    "dictionary.wispr",  # WISPr-Bandwidth-Max-Down/Up
)


@lru_cache(maxsize=4)
def load_dictionary(directory: Path = DICTIONARY_DIR) -> Dictionary:
    """The dictionary of every attribute desanet uses, read once per directory."""
    paths = [directory / name for name in FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"RADIUS dictionaries missing: {', '.join(missing)}; install the Debian package "
            "freeradius-common (make setup)"
        )
    # pyrad warns about attribute types it skips (the VSA container, nested TLVs), none of
    # which desanet uses: keep those warnings out of the gateway's log.
    pyrad_log = logging.getLogger("pyrad")
    level = pyrad_log.level
    pyrad_log.setLevel(logging.ERROR)
    try:
        return Dictionary(*(str(p) for p in paths))
    except (OSError, ParseError) as err:
        raise ConfigError(f"cannot read the RADIUS dictionaries in {directory}: {err}") from err
    finally:
        pyrad_log.setLevel(level)
