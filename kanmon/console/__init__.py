"""The web console and its HTTP API (/api/v1), served inside the node's event loop.

Role: kanmon.console.service is the node's service (uvicorn on the node's socket, TLS
from kanmon.tlscert); kanmon.console.app the Starlette application (pages and API over
the same operations the CLI calls: kanmon.admin.queue_ops through the admin plane,
kanmon.records, kanmon.alerts); kanmon.console.security the pure parts of its security
(signed sessions, CSRF tokens, roles); kanmon.console.i18n the message catalogues.

Nothing here is imported unless [console] is configured: the web stack (starlette,
jinja2, uvicorn, babel) is imported by kanmon.console.service.start(), so a node without
a console pays nothing for it.
"""
