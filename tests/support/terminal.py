"""A password typed at kanmon's prompt in a real terminal (pexpect's pty), as an
administrator types it: the new password twice, then the command's end."""

from __future__ import annotations


def type_new_password(child, password: str) -> tuple[int | None, str]:
    """Answer "New password: " and "Repeat password: " with password; (exit status, what
    the terminal showed after the prompts). The child is closed."""
    import pexpect

    try:
        child.expect("New password: ")
        child.sendline(password)
        child.expect("Repeat password: ")
        child.sendline(password)
        child.expect(pexpect.EOF)
        shown = child.before
    finally:
        child.close()
    return child.exitstatus, shown
