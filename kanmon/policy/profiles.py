"""Session profiles: which limits and checks apply to a client.

Role: pure functions from a client (address, authenticated or not) or a transaction
(direction, sender, recipient) to the resolved SessionProfile or RecipientPolicy of the
configuration. The listener calls profile_for once per connection (and again after a
successful AUTH); checks read the profile the session carries.

Trusts: the configuration (validated: every profile named exists). The client address
comes from the socket or a trusted PROXY header; a text that is not an address gets the
"default" profile, never "trusted".
Never: do I/O, or give "trusted" to a client that is neither in relay_networks nor
authenticated unless an [[ip_policy]] names it.
"""

from __future__ import annotations

import fnmatch
import ipaddress

from kanmon.config import Config, RecipientPolicySection, SessionProfile


def profile_for(client_ip: str, authenticated: bool, config: Config) -> SessionProfile:
    """The client's profile: "trusted" when authenticated; else the first [[ip_policy]]
    whose source holds the address; else "trusted" for relay_networks; else "default".
    An ip_policy is more specific than relay_networks, so it is asked first (a printer
    subnet inside relay_networks can get a profile of its own)."""
    profiles = config.session_profiles
    if authenticated:
        return profiles["trusted"]
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return profiles["default"]
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for policy in config.ip_policy:
        for net in policy.source:
            if addr in net:
                return profiles[policy.profile]
    for net in config.smtp.relay_networks:
        if addr in net:
            return profiles["trusted"]
    return profiles["default"]


def client_profile(ctx, config: Config) -> SessionProfile:
    """The profile of a check's session (a kanmon.policy.pipeline.Context): the one the
    session carries (chosen once by the listener, switched to `trusted` after AUTH), or
    for a context built without one, profile_for the client's address by the same rule."""
    if ctx.profile is not None:
        return ctx.profile
    client = ctx.client
    return profile_for(client.ip, bool(client.auth_user), config)


def recipient_policy_for(sender: str, recipient: str, config: Config) -> RecipientPolicySection | None:
    """The first [[recipient_policy]] matching the transaction, or None. The direction is
    inbound when the recipient's domain is one of ours, else outbound; patterns are
    matched case-insensitively with * and ? (sender "" is the null sender, matched as "@")."""
    if not config.recipient_policy:
        return None
    recipient = recipient.lower()
    domain = recipient.rpartition("@")[2]
    direction = "inbound" if config.find_domain(domain) is not None else "outbound"
    sender = sender.lower() or "@"
    for policy in config.recipient_policy:
        if (policy.direction == direction and fnmatch.fnmatchcase(sender, policy.sender)
                and fnmatch.fnmatchcase(recipient, policy.recipient)):
            return policy
    return None
