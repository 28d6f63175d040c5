"""The console's forms (Flask-WTF: CSRF on every one), checked with the gateway's own rules.

Each field is checked with the same function the registry and the control
endpoint use (ids, addresses, rates, sizes), with a message in the reader's
language; the whole file is then checked by the registry itself before
anything is written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, SelectField, StringField, SubmitField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, Optional, ValidationError

from desanet.errors import ValidationError as RuleError
from desanet.units import parse_bytes, parse_rate_bps
from desanet.validate import check_subscriber_id

PREFIXES_HINT = _l("Addresses or prefixes, separated by spaces: 10.77.0.10 fd77::20")
RATE_HINT = _l("A rate such as 512kbit, 2mbit or 10mbit")


def _rule(check: Callable[[str], Any], message: Any) -> Callable[[FlaskForm, Any], None]:
    """A validator applying one of the gateway's rules, speaking the reader's language."""

    def validate(form: FlaskForm, field: Any) -> None:
        value = (field.data or "").strip()
        if not value:
            return
        try:
            check(value)
        except (RuleError, ValueError) as err:
            raise ValidationError(str(message)) from err

    return validate


def _prefixes(text: str) -> None:
    for prefix in text.split():
        ipaddress.ip_network(prefix, strict=True)


def _quota(text: str) -> None:
    if parse_bytes(text) <= 0:
        raise RuleError(f"quota {text!r} must be above zero")


class LoginForm(FlaskForm):
    """User name and password."""

    name = StringField(_l("User name"), validators=[DataRequired(), Length(max=32)])
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(max=200)])
    submit = SubmitField(_l("Log in"))


class SubscriberForm(FlaskForm):
    """A subscriber's line of the subscribers file."""

    version = HiddenField()
    id = StringField(
        _l("Subscriber id"),
        validators=[
            DataRequired(_l("Give an id.")),
            _rule(
                check_subscriber_id,
                _l(
                    "Letters, digits, '_', '.' or '-' only, at most 64, "
                    "starting with a letter or digit."
                ),
            ),
        ],
    )
    name = StringField(_l("Name"), validators=[Length(max=100)])
    prefixes = StringField(
        _l("Addresses"),
        description=PREFIXES_HINT,
        validators=[
            DataRequired(_l("Give at least one address or prefix.")),
            _rule(_prefixes, _l("Not an IPv4/IPv6 address or prefix (host bits must be zero).")),
        ],
    )
    down_min = StringField(_l("Download guaranteed"), description=RATE_HINT)
    down_max = StringField(_l("Download maximum"), description=RATE_HINT)
    up_min = StringField(_l("Upload guaranteed"), description=RATE_HINT)
    up_max = StringField(_l("Upload maximum"), description=RATE_HINT)
    quota = StringField(
        _l("Monthly quota"),
        description=_l("A size such as 50GB, or empty for no quota"),
        validators=[Optional(), _rule(_quota, _l("Not a size: write it like 50GB or 500MB."))],
    )
    submit = SubmitField(_l("Save"))

    RATE_FIELDS = ("down_min", "down_max", "up_min", "up_max")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in self.RATE_FIELDS:
            getattr(self, name).validators = [
                DataRequired(_l("Give a rate.")),
                _rule(parse_rate_bps, _l("Not a rate: write it like 512kbit or 2mbit.")),
            ]


class PlanForm(FlaskForm):
    """A plan set through the control endpoint (it overrides the file's until reset)."""

    down_min = StringField(_l("Download guaranteed"), description=RATE_HINT)
    down_max = StringField(_l("Download maximum"), description=RATE_HINT)
    up_min = StringField(_l("Upload guaranteed"), description=RATE_HINT)
    up_max = StringField(_l("Upload maximum"), description=RATE_HINT)
    submit = SubmitField(_l("Change plan"))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in SubscriberForm.RATE_FIELDS:
            getattr(self, name).validators = [
                DataRequired(_l("Give a rate.")),
                _rule(parse_rate_bps, _l("Not a rate: write it like 512kbit or 2mbit.")),
            ]


class SuspendForm(FlaskForm):
    """Suspend: walled (a trickle, enough for a payment page) or blocked."""

    mode = SelectField(
        _l("How"),
        choices=[
            SelectChoice("wall", _l("Walled: a very slow rate only")),
            SelectChoice("block", _l("Blocked: no traffic at all")),
        ],
    )
    submit = SubmitField(_l("Suspend"))


class ActionForm(FlaskForm):
    """A button that only carries the CSRF token (resume, reset quota, reset plan)."""

    submit = SubmitField()


class RemoveForm(FlaskForm):
    """Confirm removing a subscriber from the file."""

    version = HiddenField()
    submit = SubmitField(_l("Remove for good"))


class LanguageForm(FlaskForm):
    """The language switch in every page's header."""

    language = SelectField(
        _l("Language"),
        choices=[SelectChoice("id", "Bahasa Indonesia"), SelectChoice("en", "English")],
    )
    next = HiddenField()
    submit = SubmitField(_l("Change"))


class UserForm(FlaskForm):
    """A new console user (admins only)."""

    name = StringField(_l("User name"), validators=[DataRequired(), Length(max=32)])
    role = SelectField(
        _l("Role"),
        choices=[
            SelectChoice("viewer", _l("viewer: reads only")),
            SelectChoice("operator", _l("operator: acts on subscribers")),
            SelectChoice("admin", _l("admin: also manages users")),
        ],
    )
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(min=8, max=200)])
    submit = SubmitField(_l("Add user"))


class RoleForm(FlaskForm):
    """Change a user's role."""

    role = SelectField(
        _l("Role"),
        choices=[
            SelectChoice("viewer", _l("viewer")),
            SelectChoice("operator", _l("operator")),
            SelectChoice("admin", _l("admin")),
        ],
    )
    submit = SubmitField(_l("Change role"))
