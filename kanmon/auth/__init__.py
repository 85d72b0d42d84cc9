"""Sender authentication: SPF, DKIM, DMARC, ARC verification and the Authentication-Results
header (docs/authentication.md). Pure computations over DNS answers given as data; the
check pipeline (kanmon.policy.authcheck) fetches the answers with its async resolver."""
