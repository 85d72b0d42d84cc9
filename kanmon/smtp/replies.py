"""Named SMTP replies, used by the session, the listener and the tests.

Every reply carries an enhanced status code (RFC 2034, RFC 3463).
"""

from kanmon.model import Reply

RSET_OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_CANNOT = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# 4xx
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_MESSAGES = Reply(421, "4.7.0", "Too many messages in this session, closing connection")
TOO_MANY_EHLO = Reply(421, "4.7.0", "Too many EHLO/HELO commands, closing connection")
TOO_MANY_NOOP = Reply(421, "4.7.0", "Too many NOOP commands, closing connection")
TOO_MANY_RSET = Reply(421, "4.7.0", "Too many RSET commands, closing connection")
CONNECTION_RATE = Reply(421, "4.7.0", "Too many connections from your address per minute, try again later")
MESSAGE_RATE = Reply(451, "4.7.1", "Error: too many messages from your address (rate limit), try again later")
RECIPIENT_RATE = Reply(451, "4.7.1", "Error: too many recipients from your address (rate limit), try again later")
LINE_FLOOD = Reply(421, "4.7.0", "Error: command line far too long, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
STORAGE_ERROR = Reply(451, "4.3.0", "Error: queue file write error, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
LOW_DISK = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")  # RFC 4954 6

# 5xx
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> received; lines must end with <CR><LF>")
SYNTAX_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")


def bad_parameter(name: str) -> Reply:
    """501 5.5.4 naming the MAIL/RCPT parameter whose value is malformed (name: a
    keyword already checked to be [A-Za-z0-9-], as the client wrote it)."""
    return Reply(501, "5.5.4", f"Syntax error in {name.upper()[:24]} parameter")


EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
UNSENDABLE_SENDER = Reply(553, "5.1.7", "Sender address rejected: it cannot be relayed in an SMTP command")
UNSENDABLE_RCPT = Reply(553, "5.1.3", "Recipient address rejected: it cannot be relayed in an SMTP command")
STRICT_SYNTAX = Reply(501, "5.5.4", "Syntax error: the address must be enclosed in <>")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
ALREADY_TLS = Reply(503, "5.5.1", "Error: TLS already active")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NO_UTF8 = Reply(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Error: message header size exceeds limit")
ROUTED_ADDRESS = Reply(550, "5.7.1", "Error: routed addresses (%, !, @ or source routes) are not accepted")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "User unknown in local recipient table")
MAIL_LOOP = Reply(554, "5.4.6", "Error: too many hops (mail loop)")
EARLY_TALKER = Reply(554, "5.5.1", "Error: talking before the greeting (protocol violation)")
UNAUTH_PIPELINING = Reply(554, "5.5.0", "Error: SMTP protocol synchronization (pipelining without PIPELINING)")
PROXY_REFUSED = Reply(550, "5.7.0", "Error: PROXY header from an untrusted address")
OVER_QUOTA = Reply(452, "4.2.2", "Mailbox full, try again later")

# AUTH (RFC 4954) and submission (RFC 6409)
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Error: invalid authentication data")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
AUTH_BLOCKED = Reply(421, "4.7.0", "Too many failed authentications; try again later")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by the authenticated user")
