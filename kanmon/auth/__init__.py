"""Sender authentication: SPF, DKIM, DMARC, ARC verification and the Authentication-Results
header, and DKIM signing of our outgoing mail (both: docs/authentication.md).
Pure computations over DNS answers given as data and the config's keys; the check pipeline
(kanmon.policy.authcheck) fetches the answers with its async resolver, the listener and the
injector sign."""
