"""Secrets out of text: passwords in URLs (`scheme://user:PASSWORD@host`) and bearer tokens,
for every log line and error message. A neutral module: settings, services and the CLI use it."""

from __future__ import annotations

import logging
import re

# user:password@ in any scheme://… ; the user part stays (it names the role, not a secret).
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?=@)")
_BEARER = re.compile(r"(?i)(?P<head>bearer\s+)(?P<secret>[^\s'\"]+)")
MASK = "***"


def redact(text: str) -> str:
    """`text` with URL passwords and bearer tokens replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    return _BEARER.sub(lambda m: m["head"] + MASK, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's rendered message (arguments included) and exception text with
    `redact`, so no handler ever sees a password or a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted, and keep only the text.
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact(text), None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Add the filter to every handler of the root logger (call after logging is configured)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
